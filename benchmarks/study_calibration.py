"""The trajectory's directional calibration on one case (docs/math.md §4): what α it measures,
why it is measured split-half, what it changes, and what it costs.

    python -m benchmarks.study_calibration [--json benchmarks/results/study_calibration.json]

mnist5k, the MLP at the SGD recipe, seed 0, forgetting 10 % and 50 %, against same-recipe
retraining. Per ratio: rel-L2 and forget / test accuracy gaps (points) of the uncalibrated
trajectory (``calibrate=False``), the default, and the default without the blocks' cross-term
factor (``mini.COUPLING = False``); the α the default reports per block; the same ratio of
exact GGN to K-FAC curvature along the uncalibrated error measured on 1,000 retained rows and
on the forget rows themselves (the bias the split-half estimate avoids); seconds of the first
calibrated call in the process, then the best of 3 calibrated and uncalibrated calls.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.curvature import Layout, ggn_quadratic
from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.methods import mini


def _vec(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _acc(m, X, y):
    with torch.no_grad():
        return float((m(X).argmax(1) == y).float().mean()) * 100


def _ratios(model, log, lay, w_a, eh, X):
    """Per K-FAC block: exact GGN / full-data K-FAC curvature along the block's part of eh, on X."""
    out = {}
    for b in mini._blocks(log):
        E = b.matrix(lay, eh)
        v = torch.zeros_like(eh)
        b.scatter(lay, v, E)
        R = log.get(f"kfac/{b.module}/U_G").T @ E @ log.get(f"kfac/{b.module}/U_A")
        kq = float((R * R * log.get(f"kfac/{b.module}/s_G")[:, None] * log.get(f"kfac/{b.module}/s_A")[None, :]).sum())
        layout_model = model
        lay.set(layout_model, w_a)
        q, _ = ggn_quadratic(layout_model, lay, (X, torch.zeros(len(X), dtype=torch.long)), M.loss_fn, [v])
        out[b.module] = round(float(q[0]) / kq, 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/study_calibration.json")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    ds = load_dataset("mnist5k", seed=0)
    recipe = M.default_recipe("mlp", "sgd")
    model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
    rec = mu.Recorder(model, checkpoints=10, total_steps=len(M.batch_schedule(ds.n_train, recipe)))
    M.train(model, ds.X_train, ds.y_train, recipe, step_callback=lambda lr, indices=None: rec.step(lr))
    log = rec.finalize((ds.X_train, ds.y_train), M.loss_fn, weight_decay=recipe.weight_decay, progress=False)
    lay = Layout(log.param_names, [tuple(s) for s in log.shapes])
    w_a = _vec(model)
    rows, first = [], None
    for ratio in (0.1, 0.5):
        f, r = forget_split(ds.n_train, ratio, seed=1)
        ref = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
        M.train(ref, ds.X_train, ds.y_train, recipe, indices=r)
        e = _vec(ref) - w_a
        accR = (_acc(ref, ds.X_train[f], ds.y_train[f]), _acc(ref, ds.X_test, ds.y_test))

        def call(**kw):
            t = time.perf_counter()
            res = mu.unlearn(model, log, indices=f, loss_fn=M.loss_fn, mode="trajectory", **kw)
            return res, time.perf_counter() - t

        if first is None:
            _, first = call()
        row = dict(ratio=ratio)
        for name, kw in (("uncalibrated", dict(calibrate=False)), ("default", {}), ("no_coupling", {})):
            mini.COUPLING = name != "no_coupling"
            try:
                res, _ = call(**kw)
            finally:
                mini.COUPLING = True
            eh = _vec(res.model) - w_a
            row[name] = dict(rel=round(float((eh - e).norm() / e.norm()), 4),
                             d_forget=round(_acc(res.model, ds.X_train[f], ds.y_train[f]) - accR[0], 2),
                             d_test=round(_acc(res.model, ds.X_test, ds.y_test) - accR[1], 2),
                             alpha=(res.info["stability"]["calibration"] or {}).get("alpha"))
            if name == "uncalibrated":
                g = torch.Generator().manual_seed(0)
                Xr = ds.X_train[r[torch.randperm(len(r), generator=g)[:1000]]]
                row["alpha_on_retained_rows"] = _ratios(model, log, lay, w_a, eh, Xr)
                row["alpha_on_forget_rows"] = _ratios(model, log, lay, w_a, eh, ds.X_train[f][:1000])
        row["seconds_best_of_3"] = {k: round(min(call(**kw)[1] for _ in range(3)), 3)
                                    for k, kw in (("default", {}), ("uncalibrated", dict(calibrate=False)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"first calibrated call in this process: {first:.3f} s", flush=True)
    with open(a.json, "w") as fh:
        json.dump({"rows": rows, "first_call_seconds": first}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
