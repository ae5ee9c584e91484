"""Optimizer-aware trajectory mode against same-recipe retraining (mnist5k, 784-128-10 MLP).

For each optimizer (plain SGD, SGD with momentum 0.9, Nesterov; AdamW with ``allow_adam=True``,
which the default refuses), train with the Recorder attached (StepLR ×0.5 every 4 epochs), then
for each forget ratio retrain with the same initialisation and batch order minus the forgotten
rows and unlearn with ``mode="auto"``. Reports rel-L2 (‖w_u − w_R‖/‖w − w_R‖), forget and test
accuracy of original / unlearned / retrained, and seconds.

    python -m benchmarks.bench_optimizers --json out/bench_optimizers.json [--epochs 6] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.errors import MiniUnlearnError

RECIPES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


def _train(ds, name, epochs, keep=None, rec_k=0, seed=0):
    model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=seed)
    opt = RECIPES[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    rec = mu.Recorder(model, checkpoints=rec_k).attach(opt) if rec_k else None
    g = torch.Generator().manual_seed(seed)
    X, y = ds.X_train, ds.y_train
    for _ in range(epochs):
        for b in torch.randperm(ds.n_train, generator=g).split(64):
            if keep is not None:
                b = b[keep[b]]
                if b.numel() == 0:
                    continue
            opt.zero_grad()
            M.loss_fn(model(X[b]), y[b]).backward()
            opt.step()
        sched.step()
    return model, rec


def _acc(m, X, y):
    with torch.no_grad():
        return float((m(X).argmax(1) == y).float().mean())


def _vec(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ratios", default="0.1,0.3,0.5")
    ap.add_argument("--optimizers", default="sgd,momentum,nesterov,adamw")
    ap.add_argument("--seeds", default="0", help="comma-separated: initialisation, batch order and "
                    "forget set (seed + 1) of each run; several give mean ± std")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ds = load_dataset("mnist5k", seed=0, preprocess="unit")
    rows = []
    for name, seed in [(n, int(sd)) for n in args.optimizers.split(",") for sd in args.seeds.split(",")]:
        model, rec = _train(ds, name, args.epochs, rec_k=10, seed=seed)
        log = rec.finalize((ds.X_train, ds.y_train), M.loss_fn, progress=False)
        for ratio in map(float, args.ratios.split(",")):
            f, r = forget_split(ds.n_train, ratio, seed=seed + 1)
            keep = torch.ones(ds.n_train, dtype=torch.bool)
            keep[f] = False
            t0 = time.perf_counter()
            ref, _ = _train(ds, name, args.epochs, keep=keep, seed=seed)
            t_retrain = time.perf_counter() - t0
            try:
                res = mu.unlearn(model, log, indices=f, loss_fn=M.loss_fn, unstable="clip",
                                 **({"allow_adam": True} if name == "adamw" else {}))
            except MiniUnlearnError as exc:  # a refusal is a result: recorded, not dropped
                rows.append(dict(optimizer=name, seed=seed, ratio=ratio, refused=type(exc).__name__,
                                 error=str(exc), retrain_seconds=t_retrain))
                print(f"{name:9s} seed {seed} {ratio:.0%}: refused ({type(exc).__name__}: {str(exc)[:120]})",
                      flush=True)
                continue
            Xf, yf = ds.X_train[f], ds.y_train[f]
            row = dict(optimizer=name, seed=seed, ratio=ratio, mode=res.mode, passes=res.passes,
                       rel_l2=float((_vec(res.model) - _vec(ref)).norm() / (_vec(model) - _vec(ref)).norm()),
                       forget_acc={k: _acc(m, Xf, yf) for k, m in (("original", model), ("unlearned", res.model),
                                                                    ("retrain", ref))},
                       test_acc={k: _acc(m, ds.X_test, ds.y_test) for k, m in (("original", model),
                                                                               ("unlearned", res.model),
                                                                               ("retrain", ref))},
                       seconds=res.seconds, retrain_seconds=t_retrain, stability=res.info.get("stability"))
            rows.append(row)
            print(f"{name:9s} seed {seed} {ratio:.0%}: rel {row['rel_l2']:.3f}  forget o/u/R "
                  + " ".join(f"{v:.3f}" for v in row["forget_acc"].values()) + "  test o/u/R "
                  + " ".join(f"{v:.3f}" for v in row["test_acc"].values())
                  + f"  {res.seconds:.2f}s vs retrain {t_retrain:.2f}s", flush=True)
    summary = {}
    for name in args.optimizers.split(","):
        for ratio in map(float, args.ratios.split(",")):
            rel = torch.tensor([r["rel_l2"] for r in rows if r["optimizer"] == name and r["ratio"] == ratio
                                and "rel_l2" in r])
            refused = sum(1 for r in rows if r["optimizer"] == name and r["ratio"] == ratio and "refused" in r)
            if rel.numel() == 0:
                summary[f"{name}@{ratio}"] = {"refused": refused}
                print(f"{name:9s} {ratio:.0%}: refused on all {refused} seeds")
                continue
            std = float(rel.std()) if rel.numel() > 1 else 0.0
            summary[f"{name}@{ratio}"] = {"rel_mean": float(rel.mean()), "rel_std": std, "runs": rel.numel()}
            print(f"{name:9s} {ratio:.0%}: rel {float(rel.mean()):.3f} ± {std:.3f} over {rel.numel()} seeds")
    with open(args.json, "w") as fh:
        json.dump({"epochs": args.epochs, "rows": rows, "summary": summary}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
