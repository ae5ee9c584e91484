"""What any first-order model of SGD retraining can reach on the sweep's MLPs.

    python -m benchmarks.study_bound [--data digits] [--seeds 0,1,2] [--ratios 0.1,0.3,0.5]
                                     [--only TEXT] [--json benchmarks/results/study_bound_digits.json]

The sweep's set-up exactly (``mini-unlearn run --model mlp --recipe sgd``: the same data, init,
recipe, batch order and forget sets): the original run with every step's weights w_t, and
same-recipe retraining w^R (the same batches minus the forgotten rows). The retraining error
e = w^R − w is integrated step by step in parameter space, with no K-FAC and no eigenbasis:

    e_{t+1} = e_t(1 − η_t λ) − η_t D_t,    D_t = (retained run's gradient) − (original's),

and each variant models D_t in one way (exact matrix-vector products by forward-mode AD):

    linear, checkpoint GGN, mean δ      GGN(w_k) e_t + δ_k: the trajectory's model (K = 10
                                        checkpoints, δ_k = ∇L_R(w_k) − ∇L(w_k)) with the exact
                                        curvature in place of the calibrated K-FAC
    ... batch δ from the forget rows    δ_t = (f·∇L(w_k) − Σ_{F∩B_t} ∇ℓ_i(w_k)) / (|B_t| − f),
                                        f = |F∩B_t|: which forget rows step t held, what a log
                                        with the batch indices and the forget passes could carry
    ... batch δ                         δ_t = (∇L_{B_t∖F} − ∇L_{B_t})(w_k): step t's own batch
    linear, step GGN, batch δ           GGN_{B_t∖F}(w_t) e_t + (∇L_{B_t∖F} − ∇L_{B_t})(w_t):
                                        every step's own point, batch and forget rows
    linear, step Hessian, batch δ       the same with the exact Hessian (GGN's dropped term too)
    nonlinear, checkpoint, K = 10 / 40  ∇L_R(w_k + e_t) − ∇L(w_k): the exact retained gradient
                                        at the corrected point, base point frozen per segment
    nonlinear, every step, mean δ       ∇L_R(w_t + e_t) − ∇L(w_t): every step, full-data means
                                        (no batch noise)

The linear rows are what a linearisation around the original run can reach, each a best case
(exact curvature; the step rows also every step's weights, which no log holds). The nonlinear
rows are oracles: they evaluate the retained gradient at every corrected step, i.e. a pass over
the retained data per step (more than retraining), and show where the rest of the error lies.
For reference, in the same run: ``mini`` (the library's default, ``unlearn(model, log,
indices=f)``) and ``deltagrad`` (its full per-step history). Reports rel-L2 = ‖w + e − w^R‖ /
‖w − w^R‖ (1.0: the untouched original) and SalUn's Avg.Gap in points on the sweep's sets (the
``run`` command's metrics: its ``mini`` and ``deltagrad`` cells are these), mean ± std over the
seeds; a seed with rel > 10 counts as diverged and is reported apart.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.evaluate import avg_gap, evaluate

VARIANTS = {  # name: (base point, model of D, checkpoints, δ)
    "linear, checkpoint GGN, mean δ (the trajectory's model, exact curvature)": ("ckpt", "ggn", 10, "mean"),
    "linear, checkpoint GGN, batch δ from the forget rows": ("ckpt", "ggn", 10, "forget"),
    "linear, checkpoint GGN, batch δ": ("ckpt", "ggn", 10, "batch"),
    "linear, step GGN, batch δ": ("step", "ggn", None, "batch"),
    "linear, step Hessian, batch δ": ("step", "hess", None, "batch"),
    "nonlinear, checkpoint, K = 10": ("ckpt", "exact", 10, "mean"),
    "nonlinear, checkpoint, K = 40": ("ckpt", "exact", 40, "mean"),
    "nonlinear, every step, mean δ": ("step", "exact", None, "mean"),
}
DIVERGED = 10.0  # rel above this: the unlearned model diverged (reported apart, not averaged)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Run:
    """One seed and ratio of the sweep's set-up: the original run's per-step weights and batches,
    its Recorder logs, same-recipe retraining, and the gradient / curvature oracles."""

    def __init__(self, ds, seed: int, ratio: float):
        self.recipe = M.default_recipe("mlp", "sgd")
        self.recipe.seed = seed
        self.X, self.y = ds.X_train, ds.y_train
        n = ds.n_train
        f, r = forget_split(n, ratio, seed=seed + 1)
        self.f, self.keep = f, torch.ones(n, dtype=torch.bool)
        self.keep[f] = False
        self.schedule = M.batch_schedule(n, self.recipe)
        spe = M.steps_per_epoch(n, self.recipe)
        self.lrs = [M.lr_at_step(self.recipe, t, spe) for t in range(len(self.schedule))]
        make = lambda: M.make_model("mlp", ds.num_features, ds.num_classes, seed=seed)  # noqa: E731
        self.model, ws = make(), []
        rec = mu.Recorder(self.model, checkpoints=10, compression="int8", total_steps=len(self.schedule))
        rec_all = mu.Recorder(self.model, checkpoints=0, compression="int8", history="all")

        def on_step(lr, indices=None):
            ws.append(_flat(self.model))
            rec_all.step(lr, indices=indices)

        M.train(self.model, self.X, self.y, self.recipe, optimizer_callback=rec.attach, step_callback=on_step)
        self.log = rec.finalize((self.X, self.y), M.loss_fn, weight_decay=self.recipe.weight_decay,
                                progress=False)
        self.log_all = rec_all.finalize((self.X, self.y), M.loss_fn, weight_decay=self.recipe.weight_decay,
                                        progress=False)
        self.ws = ws
        ref = make()
        M.train(ref, self.X, self.y, self.recipe, indices=r)
        self.w_end, self.w_ref = _flat(self.model), _flat(ref)
        # SalUn's metrics on the sweep's sets (the test split minus its first fifth, ∇τ's validation)
        n_val = max(1, ds.n_test // 5)
        self.sets = ((self.X[f], self.y[f]), (self.X[r], self.y[r]), (ds.X_test[n_val:], ds.y_test[n_val:]))
        self.seed = seed
        self.ref_metrics = evaluate(ref, *self.sets, seed=seed)
        p = list(self.model.named_parameters())
        self.names, self.shapes, self.sizes = [k for k, _ in p], [v.shape for _, v in p], [v.numel() for _, v in p]
        self._full: dict = {}

    def score(self, w: torch.Tensor) -> tuple[float, float]:
        """rel-L2 to retraining, and SalUn's Avg.Gap (points) of the model with weights ``w``."""
        rel = float((w - self.w_ref).norm() / (self.w_end - self.w_ref).norm())
        if not torch.isfinite(w).all():
            return rel, float("inf")
        model = copy.deepcopy(self.model)
        torch.nn.utils.vector_to_parameters(w, model.parameters())
        return rel, avg_gap(evaluate(model, *self.sets, seed=self.seed), self.ref_metrics)

    def _out(self, w, X):
        params = {k: t.view(s) for k, t, s in zip(self.names, w.split(self.sizes), self.shapes)}
        return functional_call(self.model, params, (X,))

    def grad(self, w, rows):
        return grad(lambda ww: F.cross_entropy(self._out(ww, self.X[rows]), self.y[rows]))(w)

    def ggn(self, w, v, rows):
        """Mean over ``rows`` of Jᵀ H_out J v (softmax cross-entropy's Gauss-Newton matrix)."""
        X = self.X[rows]
        z, Jv = jvp(lambda ww: self._out(ww, X), (w,), (v,))
        p = z.softmax(1)
        _, pull = vjp(lambda ww: self._out(ww, X), w)
        return pull((p * Jv - p * (p * Jv).sum(1, keepdim=True)) / X.shape[0])[0]

    def hvp(self, w, v, rows):
        return jvp(lambda ww: self.grad(ww, rows), (w,), (v,))[1]

    def full(self, t):
        """∇L(w_t) and ∇L_R(w_t), memoised (every variant at checkpoints reuses them)."""
        if t not in self._full:
            every = torch.arange(len(self.keep))
            self._full[t] = (self.grad(self.ws[t], every), self.grad(self.ws[t], self.keep.nonzero().reshape(-1)))
        return self._full[t]

    def simulate(self, spec) -> tuple[float, float]:
        point, curv, K, delta = spec
        T, lam = len(self.schedule), self.recipe.weight_decay
        every, kept = torch.arange(len(self.keep)), self.keep.nonzero().reshape(-1)
        e = torch.zeros_like(self.w_end)
        for t in range(T):
            b = self.schedule[t]
            br = b[self.keep[b]]
            if br.numel() == 0:  # retraining skips the step, the original took it (no measured run had one)
                e = e + self.lrs[t] * (self.grad(self.ws[t], b) + lam * self.ws[t])
                continue
            if point == "ckpt":
                t0 = (t * K // T) * T // K  # the segment's first step: its checkpoint
                wk = self.ws[t0]
                g, gR = self.full(t0)
                if curv == "exact":
                    D = self.grad(wk + e, kept) - g
                elif delta == "mean":
                    D = self.ggn(wk, e, every) + (gR - g)
                elif delta == "batch":
                    D = self.ggn(wk, e, every) + (self.grad(wk, br) - self.grad(wk, b))
                else:  # (f·∇L(w_k) − Σ_{F∩B_t} ∇ℓ_i(w_k)) / (|B_t| − f): forget rows and the log only
                    bf = b[~self.keep[b]]
                    D = self.ggn(wk, e, every)
                    if bf.numel():
                        D = D + bf.numel() * (g - self.grad(wk, bf)) / (b.numel() - bf.numel())
            elif curv == "exact":
                g, _ = self.full(t)
                D = self.grad(self.ws[t] + e, kept) - g
            else:
                w = self.ws[t]
                curve = self.ggn(w, e, br) if curv == "ggn" else self.hvp(w, e, br)
                D = curve + self.grad(w, br) - self.grad(w, b)
            e = e * (1 - self.lrs[t] * lam) - self.lrs[t] * D
            if not torch.isfinite(e).all():
                return float("inf"), float("inf")
        return self.score(self.w_end + e)

    def library(self, method: str) -> tuple[float, float]:
        log = self.log if method == "mini" else self.log_all
        res = mu.unlearn(self.model, log, indices=self.f, train_data=(self.X, self.y), loss_fn=M.loss_fn,
                         method=method)
        return self.score(_flat(res.model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="0.1,0.3,0.5")
    ap.add_argument("--only", default="", help="run only the variants whose name contains this")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    variants = {n: s for n, s in VARIANTS.items() if args.only in n}
    rows = ["mini (the library's default: calibrated K-FAC trajectory)", "deltagrad (full per-step history)"]
    rows += list(variants)
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    rel = {name: {str(r): [] for r in ratios} for name in rows}
    gap = {name: {str(r): [] for r in ratios} for name in rows}
    t0 = time.time()
    for seed in seeds:
        ds = load_dataset(args.data, seed=seed)
        for ratio in ratios:
            torch.manual_seed(seed)
            run = Run(ds, seed, ratio)
            for name in rows:
                v, g = run.simulate(variants[name]) if name in variants else run.library(name.split()[0])
                rel[name][str(ratio)].append(v)
                gap[name][str(ratio)].append(g)
                print(f"{args.data} seed {seed} ratio {ratio:.0%}  {name:72s} rel {v:.3f}  Avg.Gap {g:.2f}  "
                      f"({time.time() - t0:.0f}s)", flush=True)

    def cell(name, r):
        rs, gs = rel[name][str(r)], gap[name][str(r)]
        ok = [i for i, v in enumerate(rs) if v <= DIVERGED]
        if len(ok) < len(rs):  # rel > 10 (or inf): the model diverged; a mean would hide the others
            rest = (f", {statistics.mean(rs[i] for i in ok):.3f} / {statistics.mean(gs[i] for i in ok):.2f} in "
                    "the others") if ok else ""
            return f"diverged in {len(rs) - len(ok)}/{len(rs)} seeds{rest}"
        return (f"{statistics.mean(rs):.3f} ± {statistics.pstdev(rs):.3f} / "
                f"{statistics.mean(gs):.2f} ± {statistics.pstdev(gs):.2f}")

    print(f"\n{args.data}: rel-L2 / Avg.Gap (points) to same-recipe retraining, seeds {args.seeds}")
    print("| model of the retained run's gradient | " + " | ".join(f"{r:.0%}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for name in rows:
        print(f"| {name} | " + " | ".join(cell(name, r) for r in ratios) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "model": "mlp", "recipe": "sgd", "seeds": seeds, "ratios": ratios,
                       "variants": {n: list(s) for n, s in variants.items()}, "rel": rel, "avg_gap": gap,
                       "seconds": time.time() - t0}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
