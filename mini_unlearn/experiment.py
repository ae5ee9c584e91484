"""One unlearning experiment end to end (what ``mini-unlearn run`` and ``demo`` do): train with
recording on real data, pick a seeded forget set, run every method, evaluate each against
retraining, and report a table, JSON and a plot."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models as M
from .data import train_subset, forget_split, load_dataset
from .evaluate import avg_gap, evaluate, param_distance, peak_rss_bytes
from .distributed import LOCAL
from .errors import MiniUnlearnError
from .recorder import Recorder
from .unlearn import unlearn

NEW_BASELINES = ("salun", "scrub", "rl", "ga")
ALL_METHODS = ("mini", "mini_retain", "deltagrad", "nabla_tau", "retrain", "finetune", "neggrad",
               *NEW_BASELINES)


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
    #: minibatch optimizer: "sgd", "momentum" or "adamw" (None: the recipe's default)
    optimizer: str | None = None
    #: train on a seeded, class-stratified subset of this many training samples
    train_subset: int | None = None
    #: A sweep: these seeds (default: ``(seed,)``) ...
    seeds: tuple[int, ...] | None = None
    #: ... times these forget ratios (default: ``(forget_ratio,)``).
    forget_ratios: tuple[float, ...] | None = None

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) if self.seeds is not None else (self.seed,)

    @property
    def all_ratios(self) -> tuple[float, ...]:
        return tuple(self.forget_ratios) if self.forget_ratios is not None else (self.forget_ratio,)

    @property
    def is_sweep(self) -> bool:
        return len(self.all_seeds) > 1 or len(self.all_ratios) > 1

    def validate(self) -> None:
        if not self.all_seeds:
            raise ValueError("--seeds is empty: give at least one seed")
        if not self.all_ratios:
            raise ValueError("--forget-ratio is empty: give at least one ratio")
        if len(set(self.all_seeds)) != len(self.all_seeds):
            raise ValueError(f"--seeds repeats a seed: {list(self.all_seeds)}")
        if len(set(self.all_ratios)) != len(self.all_ratios):
            raise ValueError(f"--forget-ratio repeats a ratio: {list(self.all_ratios)}")
        for ratio in self.all_ratios:
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"--forget-ratio must be in (0, 1), got {ratio}")
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("no methods given")
        if self.model not in M.MODEL_KINDS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(M.MODEL_KINDS)}")
        if self.recipe not in (None, "lbfgs", "sgd"):
            raise ValueError(f"unknown recipe {self.recipe!r}; choose lbfgs or sgd")
        if self.optimizer not in (None, *M.OPTIMIZERS):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(M.OPTIMIZERS)}")
        if self.optimizer is not None and self.recipe == "lbfgs":
            raise ValueError("--optimizer applies to minibatch recipes, not --recipe lbfgs")
        if self.train_subset is not None and self.train_subset < 2:
            raise ValueError(f"--train-subset must be >= 2, got {self.train_subset}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")


def _plain_sgd(recipe) -> bool:
    return recipe.name == "sgd" and getattr(recipe, "optimizer", "sgd") == "sgd"


def _train_original(cfg: Config, seed: int, progress: bool) -> dict:
    """Load the data for ``seed``, train the original model with recording, finalize the logs.

    Everything the per-ratio unlearning runs share (one training per seed in a sweep).
    """
    dev = torch.device(cfg.device)
    ds = load_dataset(cfg.data, seed=seed)
    if cfg.train_subset is not None and cfg.train_subset < ds.n_train:
        ds = train_subset(ds, cfg.train_subset, seed=seed)
    recipe = M.default_recipe(cfg.model, cfg.recipe, cfg.optimizer)
    recipe.seed = seed
    if cfg.epochs is not None:
        recipe.epochs = cfg.epochs
    # Held-out validation data for ∇τ: the first fifth of the test split (never evaluated on).
    n_val = max(1, ds.n_test // 5)
    X, y = ds.X_train.to(dev), ds.y_train.to(dev)
    val = (ds.X_test[:n_val].to(dev), ds.y_test[:n_val].to(dev))
    test = (ds.X_test[n_val:].to(dev), ds.y_test[n_val:].to(dev))

    def fresh(seed=seed):
        return M.make_model(cfg.model, ds.num_features, ds.num_classes, seed=seed).to(dev)

    sgd = recipe.name == "sgd"
    steps = len(M.batch_schedule(ds.n_train, recipe)) if sgd else None
    model = fresh()
    # The Recorder attaches to the optimizer (any supported one); DeltaGrad's full history is
    # recorded by hand, for plain SGD only (it replays w <- w - lr g).
    rec = Recorder(model, checkpoints=cfg.checkpoints if sgd else 0, compression=cfg.compression,
                   total_steps=steps)
    rec_all = Recorder(model, checkpoints=0, compression=cfg.compression, history="all") \
        if (_plain_sgd(recipe) and "deltagrad" in cfg.methods) else None
    t0 = time.perf_counter()
    M.train(model, X, y, recipe, optimizer_callback=rec.attach if sgd else None,
            step_callback=(lambda lr, indices=None: rec_all.step(lr, indices=indices)) if rec_all else None,
            progress=progress)
    train_seconds = time.perf_counter() - t0
    # λ of the objective (one-shot/refresh); an attached log's trajectory uses the optimizer's own
    log = rec.finalize((X, y), M.loss_fn, weight_decay=None if getattr(recipe, "optimizer", "sgd") == "adamw"
                       else recipe.weight_decay, progress=progress)
    log_all = rec_all.finalize((X, y), M.loss_fn, weight_decay=recipe.weight_decay,
                               progress=progress) if rec_all else None
    return dict(seed=seed, dev=dev, ds=ds, recipe=recipe, n_val=n_val, X=X, y=y, val=val, test=test,
                fresh=fresh, sgd=sgd, model=model, log=log, log_all=log_all,
                train_seconds=train_seconds)


def _unlearn_ratio(cfg: Config, ctx: dict, ratio: float) -> dict:
    """Pick the seeded forget set of ``ratio``, run every method on the trained model, evaluate
    each against retraining; the single-run result dict (see :func:`run_experiment`)."""
    seed, recipe, model, log, fresh = ctx["seed"], ctx["recipe"], ctx["model"], ctx["log"], ctx["fresh"]
    X, y, dev, ds, test, sgd = ctx["X"], ctx["y"], ctx["dev"], ctx["ds"], ctx["test"], ctx["sgd"]
    f, r = forget_split(ds.n_train, ratio, seed=seed + 1)
    f, r = f.to(dev), r.to(dev)
    forget, retain = (X[f], y[f]), (X[r], y[r])
    common = dict(indices=f, train_data=(X, y), loss_fn=M.loss_fn)
    kwargs = {
        "mini": dict(log=log, method="mini", mode="auto"),
        "mini_retain": dict(log=log, method="mini", mode="auto", retain=retain, repair_epochs=2,
                             max_passes=cfg.refresh_passes),
        "deltagrad": dict(log=ctx["log_all"], method="deltagrad"),
        "nabla_tau": dict(log=log, method="nabla_tau", retain=retain, val=ctx["val"]),
        "retrain": dict(log=log, method="retrain", recipe=recipe, make_model=fresh,
                        retain_indices=r, group=LOCAL),  # under torchrun: on every rank alike
        "finetune": dict(log=log, method="finetune", retain=retain),
        "neggrad": dict(log=log, method="neggrad", retain=retain),
    }
    for name in NEW_BASELINES:  # SalUn, SCRUB, RL, GA: their papers' settings (methods/*.py)
        kwargs[name] = dict(log=log, method=name, retain=retain, seed=seed)
    # The reference: retraining with the same recipe and seed (timed like every method).
    ref_res = unlearn(model, **common, **kwargs["retrain"])
    reference = ref_res.model
    # Noise floor: the same retraining with another batch order (same initialisation).
    noise = fresh()
    noise_recipe = copy.deepcopy(recipe)
    noise_recipe.seed = seed + 1000
    M.train(noise, X, y, noise_recipe, indices=r)
    base = param_distance(model, reference)
    floor = param_distance(noise, reference)
    ref_metrics = evaluate(reference, forget, retain, test, reference=reference, original=model,
                           seconds=ref_res.seconds, seed=seed)

    results = {}
    for name in cfg.methods:
        if name == "deltagrad" and not _plain_sgd(recipe):
            results[name] = {"skipped": "DeltaGrad replays plain SGD steps (w <- w - lr g); this recipe "
                                        "has none (use --recipe sgd --optimizer sgd)"}
            continue
        try:
            res = ref_res if name == "retrain" else unlearn(model, **common, **kwargs[name])
        except MiniUnlearnError as exc:  # a method that refuses a set-up is reported, not fatal
            results[name] = {"skipped": f"refused ({type(exc).__name__}): {str(exc).split('. ')[0]}"}
            continue
        m = evaluate(res.model, forget, retain, test, reference=reference, original=model,
                     seconds=res.seconds, peak_rss_bytes=peak_rss_bytes(), seed=seed)
        m.update(history_bytes=res.history_bytes if name.startswith("mini") or name == "deltagrad" else 0,
                 passes=res.passes, grad_evals=res.grad_evals, mode=res.mode,
                 certificate=res.certificate)
        m["avg_gap"] = avg_gap(m, ref_metrics)
        m["speedup"] = ref_res.seconds / res.seconds if res.seconds > 0 else float("nan")
        results[name] = m
    noise_metrics = evaluate(noise, forget, retain, test, reference=reference, original=model,
                             seed=seed)
    original = evaluate(model, forget, retain, test, reference=reference, original=model, seed=seed)
    original["avg_gap"] = avg_gap(original, ref_metrics)
    return {
        "config": {**asdict(cfg), "seed": seed, "forget_ratio": ratio, "methods": list(cfg.methods),
                   "recipe": recipe.to_dict(), "train_seconds": ctx["train_seconds"]},
        "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": len(test[1]),
                    "n_val": ctx["n_val"], "n_forget": int(f.numel())},
        "original": original,
        "methods": results,
        "retrain_noise_floor": {"l2": floor, "rel_l2": floor / base if base > 0 else float("nan"),
                                "avg_gap": avg_gap(noise_metrics, ref_metrics),
                                "metrics": noise_metrics},
    }


def run_experiment(cfg: Config, progress: bool = True) -> dict:
    """Run ``cfg`` for its one seed and ratio (``cfg.seed``, ``cfg.forget_ratio``) and return the
    JSON-able result: ``config``, ``dataset``, ``original`` (the untouched model's metrics),
    ``methods`` (per method: :func:`~mini_unlearn.evaluate.evaluate`'s metrics plus ``avg_gap``
    -- SalUn's Avg.Gap to retraining in points --, ``speedup`` over retraining, cost counters)
    and ``retrain_noise_floor`` (a second retraining with another batch order: rel-L2 and
    Avg.Gap)."""
    cfg.validate()
    ctx = _train_original(cfg, cfg.seed, progress)
    return _unlearn_ratio(cfg, ctx, cfg.forget_ratio)


def _agg(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}


def aggregate(runs: list[dict]) -> dict:
    """Per forget ratio and method: mean ± std over seeds of every numeric metric.

    Returns ``{ratio_key: {"methods": {name: {metric: {"mean", "std", "n"}}}, "original": ...,
    "retrain_noise_floor": ..., "best": ...}}`` with ``ratio_key = f"{ratio:g}"``; ``std`` is the
    sample standard deviation (ddof = 1). ``best`` names the method (retraining excluded) with
    the lowest mean Avg.Gap, the runner-up, and whether the lead exceeds the runner-up's std.
    """
    by_ratio: dict[str, list[dict]] = {}
    for run in runs:
        by_ratio.setdefault(f"{run['config']['forget_ratio']:g}", []).append(run)
    out: dict = {}
    for key, rs in by_ratio.items():
        names = list(dict.fromkeys(n for r in rs for n in r["methods"]))

        def agg_dicts(ds: list[dict]) -> dict:
            keys = [k for k in ds[0] if all(isinstance(d.get(k), (int, float)) and
                                            not isinstance(d.get(k), bool) for d in ds)]
            return {k: _agg([float(d[k]) for d in ds]) for k in keys}

        methods = {}
        for n in names:
            ms = [r["methods"][n] for r in rs if n in r["methods"] and "skipped" not in r["methods"][n]]
            skips = [r["methods"][n]["skipped"] for r in rs if "skipped" in r["methods"].get(n, {})]
            methods[n] = agg_dicts(ms) if ms else {"skipped": skips[0] if skips else ""}
            if ms and skips:  # refused on some seeds: aggregated over the others, and said so
                methods[n]["refused_runs"] = len(skips)
                methods[n]["refused"] = skips[0]
        floor = agg_dicts([{k: v for k, v in r["retrain_noise_floor"].items() if k != "metrics"}
                           for r in rs])
        ranked = sorted((m["avg_gap"]["mean"], n) for n, m in methods.items()
                        if n != "retrain" and "avg_gap" in m and not m.get("refused_runs"))
        best = None
        if ranked:
            b = ranked[0][1]
            best = {"method": b, "avg_gap": methods[b]["avg_gap"]}
            if len(ranked) > 1:
                ru = ranked[1][1]
                lead = methods[ru]["avg_gap"]["mean"] - methods[b]["avg_gap"]["mean"]
                std = methods[ru]["avg_gap"]["std"]
                best.update(runner_up=ru, lead=lead, runner_up_std=std,
                            lead_exceeds_runner_up_std=bool(lead > std))
        out[key] = {"forget_ratio": rs[0]["config"]["forget_ratio"], "seeds": [r["config"]["seed"] for r in rs],
                    "n_forget": rs[0]["dataset"]["n_forget"], "methods": methods,
                    "original": agg_dicts([r["original"] for r in rs]),
                    "retrain_noise_floor": floor, "best": best}
    return out


def run_sweep(cfg: Config, progress: bool = True) -> dict:
    """Every (seed, forget ratio) pair of ``cfg.all_seeds`` × ``cfg.all_ratios``, training the
    original model once per seed. Returns ``{"config", "runs": [single-run results],
    "aggregates": aggregate(runs)}`` (JSON-able)."""
    cfg.validate()
    seeds, ratios = cfg.all_seeds, cfg.all_ratios
    runs = []
    bar = tqdm(total=len(seeds) * len(ratios), desc="mini_unlearn: sweep runs", unit="run",
               disable=not progress)
    try:
        for seed in seeds:
            ctx = _train_original(cfg, seed, progress=False)
            for ratio in ratios:
                bar.set_postfix(seed=seed, ratio=ratio)
                runs.append(_unlearn_ratio(cfg, ctx, ratio))
                bar.update(1)
    finally:
        bar.close()
    return {"config": {**asdict(cfg), "seeds": list(seeds), "forget_ratios": list(ratios),
                       "methods": list(cfg.methods)},
            "runs": runs, "aggregates": aggregate(runs)}


COLUMNS = [("ua", "UA", "{:.3f}"), ("retain_acc", "RA", "{:.3f}"), ("test_acc", "TA", "{:.3f}"),
           ("mia_efficacy_svc", "MIA-SVC", "{:.3f}"), ("avg_gap", "Avg.Gap", "{:.2f}"),
           ("mia_loss", "MIA-loss", "{:.3f}"),
           ("mia_efficacy_4feat", "MIA-4feat", "{:.3f}"), ("rel_l2_to_retrain", "rel-L2", "{:.3f}"),
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
    lines.append(f"retrain noise floor (another batch order): rel-L2 {nf['rel_l2']:.3f}, "
                 f"Avg.Gap {nf.get('avg_gap', float('nan')):.2f}   "
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


#: Sweep table columns: (metric key, header, scale, format of the mean and the std).
SWEEP_COLUMNS = [("ua", "UA", 100.0, "{:.2f}"), ("retain_acc", "RA", 100.0, "{:.2f}"),
                 ("test_acc", "TA", 100.0, "{:.2f}"), ("mia_efficacy_svc", "MIA-Eff", 100.0, "{:.2f}"),
                 ("avg_gap", "Avg.Gap", 1.0, "{:.2f}"), ("seconds", "RTE (s)", 1.0, "{:.2f}"),
                 ("speedup", "speed-up", 1.0, "{:.1f}"), ("rel_l2_to_retrain", "rel-L2", 1.0, "{:.3f}"),
                 ("kl_to_retrain", "KL", 1.0, "{:.4f}"), ("mia_loss", "MIA-loss", 100.0, "{:.1f}"),
                 ("mia_efficacy_4feat", "MIA-4feat", 100.0, "{:.1f}")]


def _pm(stats: dict | None, scale: float, fmt: str) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "-"
    return f"{fmt.format(scale * stats['mean'])}±{fmt.format(scale * stats['std'])}"


def _best_line(agg: dict) -> str:
    b = agg.get("best")
    if not b:
        return "best Avg.Gap: -"
    if "runner_up" not in b:
        return f"best Avg.Gap: {b['method']}"
    verdict = "exceeds" if b["lead_exceeds_runner_up_std"] else "does NOT exceed"
    return (f"best Avg.Gap: {b['method']} ({b['avg_gap']['mean']:.2f}); lead {b['lead']:.2f} over "
            f"{b['runner_up']} {verdict} the runner-up's std {b['runner_up_std']:.2f}")


def format_sweep_table(sweep: dict) -> str:
    """Per forget ratio: mean ± std over seeds of every method's metrics (UA, RA, TA and
    MIA-Efficacy in %, Avg.Gap in points, RTE in seconds, ...); ``*`` marks the best Avg.Gap
    (retraining excluded), followed by whether its lead exceeds the runner-up's std."""
    lines = []
    for key, agg in sweep["aggregates"].items():
        seeds = ",".join(str(s) for s in agg["seeds"])
        lines.append(f"forget ratio {key} ({agg['n_forget']} samples), seeds {seeds}")
        head = f"{'method':15s}" + "".join(f"{h:>16s}" for _, h, _, _ in SWEEP_COLUMNS)
        lines += [head, "-" * len(head)]
        best = (agg.get("best") or {}).get("method")
        rows = [("original", agg["original"])] + list(agg["methods"].items())
        for name, m in rows:
            mark = "*" if name == best else " "
            if "skipped" in m:
                lines.append(f"{name + mark:15s}  skipped: {m['skipped']}")
                continue
            lines.append(f"{name + mark:15s}" + "".join(f"{_pm(m.get(k), sc, fmt):>16s}"
                                                        for k, _, sc, fmt in SWEEP_COLUMNS))
        nf = agg["retrain_noise_floor"]
        lines.append(f"retrain noise floor (another batch order): Avg.Gap {_pm(nf.get('avg_gap'), 1, '{:.2f}')}, "
                     f"rel-L2 {_pm(nf.get('rel_l2'), 1, '{:.3f}')}")
        lines.append(_best_line(agg))
        lines.append("")
    return "\n".join(lines).rstrip()


def format_markdown(sweep: dict) -> str:
    """The sweep's SalUn-style summary as a markdown table (one block per forget ratio)."""
    cols = SWEEP_COLUMNS[:7]
    out = []
    for key, agg in sweep["aggregates"].items():
        out.append(f"**Forget {float(key) * 100:g}%** ({agg['n_forget']} samples, seeds "
                   f"{', '.join(str(s) for s in agg['seeds'])}; mean ± std)\n")
        out.append("| method | " + " | ".join(h for _, h, _, _ in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        best = (agg.get("best") or {}).get("method")
        for name, m in [("original (no unlearning)", agg["original"])] + list(agg["methods"].items()):
            if "skipped" in m:
                out.append(f"| {name} | {m['skipped'][:120]} |" + " |" * (len(cols) - 1))
                continue
            if m.get("refused_runs"):
                name = f"{name} (refused in {m['refused_runs']} of {len(agg['seeds'])} runs, mean of the rest)"
            cells = []
            for k, _, sc, fmt in cols:
                c = _pm(m.get(k), sc, fmt).replace("±", " ± ")
                cells.append(f"**{c}**" if (k == "avg_gap" and name == best) else c)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        nf = agg["retrain_noise_floor"]
        out.append(f"\nRetraining's noise floor (another batch order): Avg.Gap "
                   f"{_pm(nf.get('avg_gap'), 1, '{:.2f}').replace('±', ' ± ')}. {_best_line(agg)}.\n")
    return "\n".join(out)


def plot_sweep(sweep: dict, path: str) -> None:
    """Avg.Gap (y) against speed-up over retraining (log x), one panel per forget ratio, one
    marker per method, error bars = std over seeds; the dashed line is retraining's noise floor,
    the dotted one the untouched original's Avg.Gap (doing nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggs = sweep["aggregates"]
    names = list(dict.fromkeys(n for a in aggs.values() for n, m in a["methods"].items()
                               if n != "retrain" and "avg_gap" in m))
    markers = "osD^vP*Xh<>p"
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(aggs), figsize=(4.6 * len(aggs), 4.0), squeeze=False)
    for ax, (key, agg) in zip(axes[0], aggs.items()):
        for i, n in enumerate(names):
            m = agg["methods"].get(n)
            if not m or "avg_gap" not in m:
                continue
            ax.errorbar(m["speedup"]["mean"], m["avg_gap"]["mean"], xerr=m["speedup"]["std"],
                        yerr=m["avg_gap"]["std"], fmt=markers[i % len(markers)], color=cmap(i),
                        capsize=3, label=n, markersize=7)
        nf = agg["retrain_noise_floor"].get("avg_gap")
        if nf:
            ax.axhline(nf["mean"], ls="--", color="gray", lw=1, label="retrain noise floor")
        og = agg["original"].get("avg_gap")
        if og:
            ax.axhline(og["mean"], ls=":", color="black", lw=1, label="original (no unlearning)")
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over retraining (×, log)")
        ax.set_ylabel("Avg.Gap to retraining (points)")
        ax.set_title(f"forget {float(key) * 100:g}% (n={agg['n_forget']})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    cfg = sweep["config"]
    fig.suptitle(f"{cfg['data']} {cfg['model']}: mean ± std over seeds {cfg['seeds']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
