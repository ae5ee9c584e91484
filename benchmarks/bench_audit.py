"""U-LiRA costs: shadow training with ``torch.func.vmap`` over stacked models against one
``models.train`` after the other, and (``--full``) a whole audit on MNIST-5k / MLP.

    python -m benchmarks.bench_audit --json benchmarks/results/bench_audit.json [--full] [--shadows 16]

Rows (``vmap_vs_loop``): data set, model, number of shadows, seconds for each way (best of
``--repeats``), the speed-up, and the largest parameter difference between the two (they follow
the same batch sequences, so they agree to float rounding). ``--full`` adds one
``run_audit`` on mnist5k / MLP (SGD recipe) with ``--shadows`` shadows and the methods of
``--methods``, its wall time and per-method U-LiRA accuracy / AUC.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from mini_unlearn import models as M
from mini_unlearn.audit import AuditConfig, assign, format_audit_table, run_audit, train_shadows
from mini_unlearn.data import load_dataset


def vmap_vs_loop(data: str, model: str, shadows: int, repeats: int, epochs: int | None) -> dict:
    ds = load_dataset(data, seed=0)
    n = ds.n_train
    inside = assign(n, torch.arange(min(64, n // 2)), shadows, seed=0)
    rows = [torch.nonzero(inside[s]).reshape(-1) for s in range(shadows)]
    base = M.default_recipe(model, "sgd")
    if epochs is not None:
        base.epochs = epochs
    recipes = []
    for s in range(shadows):
        r = copy.deepcopy(base)
        r.seed = s
        recipes.append(r)
    makes = [lambda s=s: M.make_model(model, ds.num_features, ds.num_classes, seed=s)
             for s in range(shadows)]
    out = {}
    models = {}
    for how in ("vmap", "loop"):
        best = float("inf")
        for _ in range(repeats):
            ms, sec, _ = train_shadows(makes, ds.X_train, ds.y_train, rows, recipes, how)
            best = min(best, sec)
        out[f"{how}_seconds"] = best
        models[how] = ms
    diff = max(float((p - q).detach().abs().max()) for a, b in zip(models["vmap"], models["loop"])
               for p, q in zip(a.parameters(), b.parameters()))
    return {"data": data, "model": model, "shadows": shadows, "train_rows": int(rows[0].numel()),
            "epochs": base.epochs, "steps": len(M.batch_schedule(int(rows[0].numel()), base)),
            **out, "speedup_vmap": out["loop_seconds"] / out["vmap_seconds"],
            "max_param_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also one whole audit on mnist5k / MLP")
    ap.add_argument("--methods", default="original,retrain,finetune,neggrad,salun,scrub,rl,ga,mini")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res: dict = {"torch": torch.__version__, "machine": platform.machine(),
                 "threads": torch.get_num_threads(), "vmap_vs_loop": []}
    for data, model in (("digits", "logreg"), ("digits", "mlp"), ("mnist5k", "mlp")):
        row = vmap_vs_loop(data, model, args.shadows, args.repeats, None)
        print(json.dumps(row), flush=True)
        res["vmap_vs_loop"].append(row)
    if args.full:
        cfg = AuditConfig(data="mnist5k", model="mlp", recipe="sgd", shadows=args.shadows,
                          methods=tuple(args.methods.split(",")))
        t0 = time.perf_counter()
        audit = run_audit(cfg, progress=False)
        audit["wall_seconds"] = time.perf_counter() - t0
        print(format_audit_table(audit))
        print(f"wall {audit['wall_seconds']:.1f} s", flush=True)
        res["full_audit"] = audit
    with open(args.json, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
