"""When does the trajectory's linearisation hold? The linearity check against retraining, and
BatchNorm statistics without retained data, on two SGD-trained models.

For each model and forget ratio (10/30/50 %), with the check switched off
(``linearity_limit=None``): the trajectory's forget/test accuracy against same-recipe retraining
and the original, and the ratio actual/predicted of the forget set's mean KL(p_wa ‖ p_w) for the
trajectory's w_u and for retraining's own w_R (``mini_unlearn.methods.mini.linearity``). For the
BatchNorm CNN also: the running statistics of the unlearned model, (a) kept from the original
(the default without ``retain=``), (b) "composed": the original's minus the forget set's share,
(n·stats − r·forget stats at w_a)/(n − r), (c) recalibrated on the retained data (the default
with ``retain=``), as relative error of running mean/var against (c) and test accuracy.
``ggn_quadratic``: the exact GGN quadratic model ½ Δwᵀ F Δw of each step (mini's, retraining's)
on the forget set, by forward-mode Jacobian products: where it matches the actual KL while the
K-FAC prediction is far below, the step is still in the quadratic regime and it is K-FAC that
understates the curvature along it.

    python benchmarks/study_linearity.py [--models mlp,cnn,resnet] [--json benchmarks/results/study_linearity.json]

Models: ``mlp`` on mnist5k (the SGD recipe, 20 epochs); ``cnn`` (conv-BN-ReLU ×2, SGD with
momentum 0.9, cosine, 8 epochs) on a 2,000-image mnist5k subset; ``resnet`` (the small
pre-activation ResNet, momentum 0.9, cosine, 10 epochs) on a 2,000-image Fashion-MNIST subset.
About 1 minute on 2 cores for mlp,cnn; 5 more for resnet.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mini_unlearn as mu  # noqa: E402
from mini_unlearn import models as M  # noqa: E402
from mini_unlearn.curvature import Layout, recalibrate_norm_stats  # noqa: E402
from mini_unlearn.curvature import ggn_quadratic as ggn_q  # noqa: E402
from mini_unlearn.data import forget_split, load_dataset, train_subset  # noqa: E402
from mini_unlearn.methods.mini import forget_pass, linearity  # noqa: E402
from mini_unlearn.recorder import segment_weights  # noqa: E402


def _acc(m, X, y) -> float:
    m = copy.deepcopy(m).eval()
    with torch.no_grad():
        return 100.0 * float((m(X).argmax(1) == y).float().mean())


def _stats(m):
    return [(b.running_mean.clone(), b.running_var.clone()) for b in m.modules() if isinstance(b, _BatchNorm)]


def _set_stats(m, st) -> None:
    for b, (mean, var) in zip([b for b in m.modules() if isinstance(b, _BatchNorm)], st):
        b.running_mean.copy_(mean)
        b.running_var.copy_(var)


def _rel(st, ref, i: int) -> float:
    return sum(float((a[i] - b[i]).norm()) for a, b in zip(st, ref)) / sum(float(b[i].norm()) for b in ref)


def ggn_quadratic(model, layout, w0, dw, X, y, train_mode: bool, batch_size: int = 64) -> float:
    """½ · mean over the samples of (J Δw)ᵀ H_out (J Δw) at w0: the exact GGN (= second-order KL)
    quadratic model of the step Δw (``mini_unlearn.curvature.ggn_quadratic``), normalisation
    layers in training's mode, in batches of ``batch_size``."""
    m = copy.deepcopy(model)
    layout.set(m, w0)
    q, _ = ggn_q(m, layout, (X, y), M.loss_fn, [dw], batch_size=batch_size, train_mode=train_mode)
    return 0.5 * float(q[0])


def _setup(kind: str):
    if kind == "cnn":
        ds = train_subset(load_dataset("mnist5k", seed=0), 2000, seed=0)
        recipe = M.default_recipe("cnn", optimizer="momentum")
        recipe.epochs = 8
    elif kind == "resnet":
        ds = train_subset(load_dataset("fashion-mnist", seed=0), 2000, seed=0)
        recipe = M.default_recipe("resnet", optimizer="momentum")
        recipe.epochs = 10
    else:
        ds = load_dataset("mnist5k", seed=0, preprocess="unit")
        recipe = M.default_recipe("mlp", "sgd")
    return ds, recipe, (lambda: M.make_model(kind, ds.num_features, ds.num_classes, seed=0))


def study(kind: str, checkpoints: int = 10) -> list[dict]:
    ds, recipe, fresh = _setup(kind)
    X, y, n = ds.X_train, ds.y_train, ds.n_train
    model = fresh()
    rec = mu.Recorder(model, checkpoints=checkpoints, total_steps=len(M.batch_schedule(n, recipe)))
    M.train(model, X, y, recipe, optimizer_callback=rec.attach)
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    layout = Layout(log.param_names, [tuple(s) for s in log.shapes])
    w_a = log.flatten(model)
    rows = []
    for ratio in (0.1, 0.3, 0.5):
        f, r = forget_split(n, ratio, seed=1)
        ref = fresh()
        M.train(ref, X, y, recipe, indices=r)
        res = mu.unlearn(model, log, indices=f, loss_fn=M.loss_fn, linearity_limit=None)
        probe = copy.deepcopy(model)  # the forget curvature where the trajectory takes it: w̄_K
        K = len(log.meta["segments"])
        bs = int(log.meta.get("pass_batch_size", 512))  # what unlearn's passes use
        fs = forget_pass(probe, layout, log, segment_weights(log, K - 1, w_a), (X[f], y[f]), M.loss_fn,
                         curvature=True, batch_size=bs, device=w_a.device)
        lin_R = linearity(probe, layout, log, w_a, log.flatten(ref), (X[f], y[f]), bs, w_a.device, fs)
        train = bool(log.meta.get("train_mode", False)) and kind != "mlp"
        quad = {k: ggn_quadratic(model, layout, w_a, log.flatten(m) - w_a, X[f], y[f], train)
                for k, m in (("mini", res.model), ("retrain", ref))}
        row = dict(model=kind, ratio=ratio, ggn_quadratic=quad,
                   forget_acc={k: _acc(m, X[f], y[f]) for k, m in (("original", model), ("mini", res.model),
                                                                    ("retrain", ref))},
                   test_acc={k: _acc(m, ds.X_test, ds.y_test) for k, m in (("original", model),
                                                                          ("mini", res.model), ("retrain", ref))},
                   linearity_mini=res.info["stability"]["linearity"], linearity_retrain=lin_R)
        if kind in ("cnn", "resnet"):
            orig = _stats(model)
            fa = copy.deepcopy(model)
            recalibrate_norm_stats(fa, (X[f], y[f]))
            composed = []
            for (mr, vr), (mf, vf) in zip(orig, _stats(fa)):
                mR = (n * mr - len(f) * mf) / (n - len(f))
                e2 = (n * (vr + mr ** 2) - len(f) * (vf + mf ** 2)) / (n - len(f))
                composed.append((mR, (e2 - mR ** 2).clamp_min(1e-5)))
            ideal = copy.deepcopy(res.model)
            recalibrate_norm_stats(ideal, (X[r], y[r]))
            target = _stats(ideal)
            row["bn_stats"] = {}
            for name, st in (("kept", orig), ("composed", composed), ("recalibrated", target)):
                m = copy.deepcopy(res.model)
                _set_stats(m, st)
                row["bn_stats"][name] = dict(mean_rel_err=_rel(st, target, 0), var_rel_err=_rel(st, target, 1),
                                             test_acc=_acc(m, ds.X_test, ds.y_test))
        rows.append(row)
        lm, lr_ = row["linearity_mini"], row["linearity_retrain"]
        print(f"{kind} {ratio:.0%}: test o/u/R " + " ".join(f"{v:.1f}" for v in row["test_acc"].values())
              + "  forget o/u/R " + " ".join(f"{v:.1f}" for v in row["forget_acc"].values())
              + f"  KL ratio mini {lm['ratio']:.1f} retrain {lr_['ratio']:.1f}"
              + f"  KL mini {lm['actual']:.3f} (K-FAC {lm['predicted']:.4f}, exact GGN {quad['mini']:.3f})"
              + ("  BN test kept/composed/recal " + "/".join(f"{v['test_acc']:.1f}" for v in row["bn_stats"].values())
                 if "bn_stats" in row else ""), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="benchmarks/results/study_linearity.json")
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn, resnet")
    ap.add_argument("--checkpoints", type=int, default=10, help="the Recorder's K (default 10)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = [row for kind in args.models.split(",") for row in study(kind, args.checkpoints)]
    with open(args.json, "w") as fh:
        json.dump({"rows": rows}, fh, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
