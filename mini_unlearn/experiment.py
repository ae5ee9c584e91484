"""One unlearning experiment end to end (what ``mini-unlearn run`` and ``demo`` do): train with
recording on real data, pick a seeded forget set, run every method, evaluate each against
retraining, and report a table, JSON and a plot."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch

from . import models as M
from .data import forget_split, load_dataset
from .evaluate import evaluate, param_distance, peak_rss_bytes
from .recorder import Recorder
from .unlearn import unlearn

ALL_METHODS = ("mini", "mini_refresh", "deltagrad", "nabla_tau", "retrain", "finetune", "neggrad")


@dataclass
class Config:
    data: str = "mnist5k"
    model: str = "mlp"
    forget_ratio: float = 0.3
    methods: tuple[str, ...] = ALL_METHODS
    seed: int = 0
    recipe: str | None = None
    epochs: int | None = None
    checkpoints: int = 10
    compression: str = "int8"
    device: str = "cpu"
    refresh_passes: int = 8

    def validate(self) -> None:
        if not 0.0 < self.forget_ratio < 1.0:
            raise ValueError(f"--forget-ratio must be in (0, 1), got {self.forget_ratio}")
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("no methods given")
        if self.model not in M.MODEL_KINDS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(M.MODEL_KINDS)}")
        if self.recipe not in (None, "lbfgs", "sgd"):
            raise ValueError(f"unknown recipe {self.recipe!r}; choose lbfgs or sgd")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")


def _pass_batch(rec_min: Recorder, rec_all: Recorder | None):
    def step(lr, indices=None):
        rec_min.step(lr)
        if rec_all is not None:
            rec_all.step(lr, indices=indices)
    return step


def run_experiment(cfg: Config, progress: bool = True) -> dict:
    """Run ``cfg`` and return the JSON-able result (see the CLI's ``run`` help for its keys)."""
    cfg.validate()
    dev = torch.device(cfg.device)
    ds = load_dataset(cfg.data, seed=cfg.seed)
    recipe = M.default_recipe(cfg.model, cfg.recipe)
    recipe.seed = cfg.seed
    if cfg.epochs is not None:
        recipe.epochs = cfg.epochs
    # Held-out validation data for ∇τ: the first fifth of the test split (never evaluated on).
    n_val = max(1, ds.n_test // 5)
    X, y = ds.X_train.to(dev), ds.y_train.to(dev)
    val = (ds.X_test[:n_val].to(dev), ds.y_test[:n_val].to(dev))
    test = (ds.X_test[n_val:].to(dev), ds.y_test[n_val:].to(dev))

    def fresh(seed=cfg.seed):
        return M.make_model(cfg.model, ds.num_features, ds.num_classes, seed=seed).to(dev)

    sgd = recipe.name == "sgd"
    steps = len(M.batch_schedule(ds.n_train, recipe)) if sgd else None
    model = fresh()
    rec = Recorder(model, checkpoints=cfg.checkpoints if sgd else 0, compression=cfg.compression,
                   total_steps=steps)
    rec_all = Recorder(model, checkpoints=0, compression=cfg.compression, history="all") \
        if (sgd and "deltagrad" in cfg.methods) else None
    t0 = time.perf_counter()
    M.train(model, X, y, recipe, step_callback=_pass_batch(rec, rec_all), progress=progress)
    train_seconds = time.perf_counter() - t0
    log = rec.finalize((X, y), M.loss_fn, weight_decay=recipe.weight_decay, progress=progress)
    log_all = rec_all.finalize((X, y), M.loss_fn, weight_decay=recipe.weight_decay,
                               progress=progress) if rec_all else None

    f, r = forget_split(ds.n_train, cfg.forget_ratio, seed=cfg.seed + 1)
    f, r = f.to(dev), r.to(dev)
    forget, retain = (X[f], y[f]), (X[r], y[r])
    common = dict(indices=f, train_data=(X, y), loss_fn=M.loss_fn)
    kwargs = {
        "mini": dict(log=log, method="mini", mode="auto"),
        "mini_refresh": dict(log=log, method="mini", mode="refresh", retain=retain,
                             max_passes=cfg.refresh_passes),
        "deltagrad": dict(log=log_all, method="deltagrad"),
        "nabla_tau": dict(log=log, method="nabla_tau", retain=retain, val=val),
        "retrain": dict(log=log, method="retrain", recipe=recipe, make_model=fresh,
                        retain_indices=r),
        "finetune": dict(log=log, method="finetune", retain=retain),
        "neggrad": dict(log=log, method="neggrad", retain=retain),
    }
    # The reference: retraining with the same recipe and seed (timed like every method).
    ref_res = unlearn(model, **common, **kwargs["retrain"])
    reference = ref_res.model
    # Noise floor: the same retraining with another batch order (same initialisation).
    noise = fresh()
    noise_recipe = copy.deepcopy(recipe)
    noise_recipe.seed = cfg.seed + 1000
    M.train(noise, X, y, noise_recipe, indices=r)
    base = param_distance(model, reference)
    floor = param_distance(noise, reference)

    results = {}
    for name in cfg.methods:
        if name == "deltagrad" and not sgd:
            results[name] = {"skipped": "DeltaGrad replays SGD/GD steps; the lbfgs recipe has none "
                                        "(use --recipe sgd)"}
            continue
        res = ref_res if name == "retrain" else unlearn(model, **common, **kwargs[name])
        m = evaluate(res.model, forget, retain, test, reference=reference, original=model,
                     seconds=res.seconds, peak_rss_bytes=peak_rss_bytes(), seed=cfg.seed)
        m.update(history_bytes=res.history_bytes if name.startswith("mini") or name == "deltagrad" else 0,
                 passes=res.passes, grad_evals=res.grad_evals, mode=res.mode,
                 certificate=res.certificate)
        results[name] = m
    return {
        "config": {**asdict(cfg), "methods": list(cfg.methods), "recipe": recipe.to_dict(),
                   "train_seconds": train_seconds},
        "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": len(test[1]), "n_val": n_val,
                    "n_forget": int(f.numel())},
        "original": evaluate(model, forget, retain, test, reference=reference, original=model,
                             seed=cfg.seed),
        "methods": results,
        "retrain_noise_floor": {"l2": floor, "rel_l2": floor / base if base > 0 else float("nan")},
    }


COLUMNS = [("test_acc", "test", "{:.3f}"), ("retain_acc", "retain", "{:.3f}"),
           ("forget_acc", "forget", "{:.3f}"), ("mia_loss", "MIA-loss", "{:.3f}"),
           ("mia_efficacy", "MIA-eff", "{:.3f}"), ("rel_l2_to_retrain", "rel-L2", "{:.3f}"),
           ("kl_to_retrain", "KL", "{:.4f}"), ("seconds", "seconds", "{:.3f}"),
           ("passes", "passes", "{:.0f}"), ("history_bytes", "history", "{:.0f}")]


def format_table(result: dict) -> str:
    """The comparison table: one row per method, the original and retraining's noise floor."""
    head = f"{'method':14s}" + "".join(f"{h:>10s}" for _, h, _ in COLUMNS)
    lines = [head, "-" * len(head)]

    def row(name, m):
        if "skipped" in m:
            return f"{name:14s}  skipped: {m['skipped']}"
        cells = "".join(f"{(fmt.format(m[k]) if m.get(k) is not None else '-'):>10s}" for k, _, fmt in COLUMNS)
        return f"{name:14s}{cells}"

    lines.append(row("original", result["original"]))
    for name, m in result["methods"].items():
        lines.append(row(name, m))
    nf = result["retrain_noise_floor"]
    ds = result["dataset"]
    lines.append(f"retrain noise floor (another batch order): rel-L2 {nf['rel_l2']:.3f}   "
                 f"[{ds['name']}: {ds['n_train']} train, {ds['n_forget']} forgotten, {ds['n_test']} test]")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bars per method: test-accuracy gap and MIA gap to retraining, rel-L2, and time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = {k: v for k, v in result["methods"].items() if "skipped" not in v}
    ref = ms.get("retrain") or result["original"]
    names = list(ms)
    panels = [
        ("|test acc − retrain| (pp)", [100 * abs(ms[n]["test_acc"] - ref["test_acc"]) for n in names]),
        ("|forget acc − retrain| (pp)", [100 * abs(ms[n]["forget_acc"] - ref["forget_acc"]) for n in names]),
        ("rel. L2 to retrain", [ms[n].get("rel_l2_to_retrain", float("nan")) for n in names]),
        ("seconds", [ms[n]["seconds"] for n in names]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(names, vals, color=["tab:red" if n.startswith("mini") else "tab:gray" for n in names])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    axes[3].set_yscale("log")
    ds = result["dataset"]
    fig.suptitle(f"{ds['name']} {result['config']['model']}: forget {ds['n_forget']} of {ds['n_train']}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
