"""Design study of the trajectory mode on MNIST-5k, SGD recipe (batch 64, 20 epochs,
step decay): the number of checkpoints K = 5, 10, 20; free segment-mean minibatch gradients
against exact full-data gradients at the checkpoints; one final curvature spectrum against
per-segment spectra ("seg_spectra": K-FAC at each segment's mean weights on 1,000 samples). Distances are to same-recipe retraining.

    python -m benchmarks.study_trajectory --json study.json [--quick]
"""
from __future__ import annotations

import argparse
import json

import torch

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset


def _vec(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def study(kind: str, ratios, Ks) -> list[dict]:
    ds = load_dataset("mnist5k", seed=0)
    recipe = M.default_recipe(kind, "sgd")
    if kind == "logreg":
        recipe.weight_decay = 1e-3
    model = M.make_model(kind, ds.num_features, ds.num_classes, seed=0)
    steps = len(M.batch_schedule(ds.n_train, recipe))
    recs = {K: mu.Recorder(model, checkpoints=K, total_steps=steps) for K in Ks}

    def step(lr, indices=None):
        for r in recs.values():
            r.step(lr)

    M.train(model, ds.X_train, ds.y_train, recipe, step_callback=step)
    data = (ds.X_train, ds.y_train)
    logs = {}
    for K, rec in recs.items():
        logs[(K, "segment_mean")] = rec.finalize(data, M.loss_fn, weight_decay=recipe.weight_decay, progress=False)
        if K == 10:
            logs[(K, "exact")] = rec.finalize(data, M.loss_fn, weight_decay=recipe.weight_decay,
                                              progress=False, exact_checkpoint_grads=True)
            logs[(K, "seg_spectra")] = rec.finalize(data, M.loss_fn, weight_decay=recipe.weight_decay,
                                                    progress=False, segment_spectra=1000)
    rows = []
    for ratio in ratios:
        f, r = forget_split(ds.n_train, ratio, seed=1)
        ref = M.make_model(kind, ds.num_features, ds.num_classes, seed=0)
        M.train(ref, ds.X_train, ds.y_train, recipe, indices=r)
        base = float((_vec(model) - _vec(ref)).norm())
        for (K, grads), log in logs.items():
            res = mu.unlearn(model, log, indices=f, loss_fn=M.loss_fn, mode="trajectory")
            rel = float((_vec(res.model) - _vec(ref)).norm()) / base
            rows.append(dict(model=kind, ratio=ratio, K=K, grads=grads, rel_to_retrain=rel,
                             seconds=res.seconds, history_bytes=log.nbytes()))
            print(f"{kind:6s} {ratio:4.0%} K={K:2d} {grads:12s} rel {rel:.3f}  {res.seconds:.2f}s  "
                  f"{log.nbytes() / 1e6:.2f} MB", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    ratios = (0.1, 0.5) if a.quick else (0.01, 0.1, 0.3, 0.5)
    rows = study("logreg", ratios, (5, 10, 20)) + study("mlp", ratios, (5, 10, 20))
    with open(a.json, "w") as fh:
        json.dump({"rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
