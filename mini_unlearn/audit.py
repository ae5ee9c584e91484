"""U-LiRA: a per-example likelihood-ratio audit of unlearning with shadow models.

Hayes, Shumailov, Triantafillou, Khalifa, Papernot: "Inexact unlearning needs more careful
evaluations to avoid a false sense of privacy" (2024). An approximate unlearning method passes
when, for a given example, a model that *learned and then unlearned* it cannot be told apart
from a model that *never saw* it -- tested per example, with shadow models that were put
through the method under test.

The design here (:func:`run_audit`):

1. **Shadows.** ``N`` (even) shadow models, each trained from its own initialisation and batch
   order on exactly half of the pool (the data set's training split). ``k`` *targets* are drawn
   from the pool; each target is in the training set of exactly ``N/2`` shadows (balanced, as
   in LiRA), the rest of every shadow's half is filled with random non-targets.
2. **Unlearning.** Every shadow unlearns the targets it was trained on (its forget set) with
   the method under test (``unlearn()``, the same settings as ``mini-unlearn run``), so every
   shadow plays both roles: for a target ``x``, the shadows that trained on it hold the
   *unlearned* ("with") models, the others the *never-seen* ("without") ones.
   Auditing ``mini`` / ``mini_retain`` on an SGD recipe records every shadow's run (K = 10
   checkpoints, as ``mini-unlearn run``), so those shadows train one by one, not by vmap.
   ``"original"`` skips the unlearning (the untouched models: plain LiRA membership inference,
   the ceiling); ``"retrain"`` retrains exactly (the floor: its score is what 0.5 looks like at
   this number of shadows and targets).
3. **Score.** The logit-scaled true-class confidence ``φ = log p_y − log(1 − p_y)``
   (``= z_y − logsumexp_{j≠y} z_j``, computed stably from the logits).
4. **Attack**, leave one shadow out: for each shadow ``s`` and target ``x``, Gaussians
   ``N(μ_with(x), σ_with²)`` and ``N(μ_without(x), σ_without²)`` are fitted to ``φ`` over the
   other ``N − 1`` shadows -- per-example means; per-example variances when every group has at
   least ``PER_EXAMPLE_VARIANCE_MIN`` members, else one pooled variance per group (LiRA's
   "fixed variance", the recommended choice for few shadows) -- and the log likelihood ratio
   is evaluated on shadow ``s``'s model. Label: ``x`` was unlearned by ``s`` (1) or never seen (0).
   Reported: accuracy of ``log LR > 0`` (classes are balanced) and the AUC over all
   ``N · k`` (shadow, target) pairs. **0.5 is ideal**; retraining's own value is the floor.

Training the shadows: for SGD recipes all ``N`` shadows take their steps together as one
``torch.func.vmap`` over stacked parameters (same recipe, each shadow its own batch order and
initialisation; the batches have equal sizes because every shadow trains on exactly half the
pool), or one after the other with ``models.train`` (``train="loop"``). Both follow the same
batch sequences (they agree to float rounding: 1e-7 after 240 steps, 4e-3 on the MNIST MLP
after 640). Measured with ``python -m benchmarks.bench_audit --json
benchmarks/results/bench_audit.json --full --shadows 16 --threads 1`` (16 shadows, SGD recipe,
20 epochs, one thread, on the shared and busy 2-core machine; two runs): vmap is 2.4-2.8×
faster for logistic regression on digits (1.2-1.3 s against 3.0-3.5 s), 2.0× for the MLP on
digits (2.3-2.4 s against 4.5-4.7 s), and 0.96-1.3× for the MLP on MNIST-5k (19.8-23.5 s
against 22.5-26.1 s: large matrix products are compute-bound either way). ``train="auto"``
therefore takes vmap for every SGD recipe (unless Mini-Unlearning is audited, see above).
L-BFGS recipes always train one after the other.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import models as M
from .data import load_dataset
from .errors import MiniUnlearnError

__all__ = ["AuditConfig", "run_audit", "train_shadows", "lira_scores", "ulira_attack",
           "format_audit_table", "AUDIT_METHODS"]

#: Trajectory checkpoints recorded per shadow when Mini-Unlearning is audited (as ``run``'s K).
RECORD_CHECKPOINTS = 10
#: Per-example variances need this many shadows in each group (else pooled variances).
PER_EXAMPLE_VARIANCE_MIN = 16
#: Methods the audit accepts: every unlearning method but the ones needing a recorded
#: trajectory of the shadow (DeltaGrad), plus "original" (no unlearning).
AUDIT_METHODS = ("original", "retrain", "mini", "mini_retain", "nabla_tau", "finetune", "neggrad",
                 "salun", "scrub", "rl", "ga")


class AuditError(MiniUnlearnError, ValueError):
    """An audit's configuration is invalid (reported in one line by the CLI)."""


@dataclass
class AuditConfig:
    """One U-LiRA audit (see the module docstring).

    Attributes:
        data: data set name or .npz path; the pool is its training split.
        model: ``"logreg"`` or ``"mlp"``.
        methods: the methods to audit (see :data:`AUDIT_METHODS`).
        shadows: number of shadow models ``N`` (even, >= 6).
        targets: number of target examples ``k``.
        seed: seeds the data split, the targets, the assignment, inits and batch orders.
        recipe: ``None`` (the model's default), ``"sgd"`` or ``"lbfgs"``.
        epochs: override the SGD recipe's epochs.
        train: ``"auto"`` (vmap for SGD), ``"vmap"`` or ``"loop"``.
        pool: use this many rows of the training split as the pool (default: all); each
            shadow trains on half of it. Smaller pools memorise more.
        weight_decay: override the recipe's weight decay.
        lr: override the SGD recipe's initial learning rate.
    """

    data: str = "digits"
    model: str = "logreg"
    methods: tuple[str, ...] = ("original", "retrain", "finetune")
    shadows: int = 16
    targets: int = 128
    seed: int = 0
    recipe: str | None = None
    epochs: int | None = None
    train: str = "auto"
    pool: int | None = None
    weight_decay: float | None = None
    lr: float | None = None

    def validate(self) -> None:
        if self.shadows < 6 or self.shadows % 2:
            raise AuditError(f"--shadows must be an even number >= 6, got {self.shadows}")
        if self.targets < 2:
            raise AuditError(f"--targets must be >= 2, got {self.targets}")
        if not self.methods:
            raise AuditError("no methods given")
        bad = [m for m in self.methods if m not in AUDIT_METHODS]
        if bad:
            raise AuditError(f"unknown or unsupported audit method(s) {', '.join(bad)}; choose "
                             f"from {', '.join(AUDIT_METHODS)}")
        if self.model not in M.MODEL_KINDS:
            raise AuditError(f"unknown model {self.model!r}; choose from {', '.join(M.MODEL_KINDS)}")
        if self.recipe not in (None, "sgd", "lbfgs"):
            raise AuditError(f"unknown recipe {self.recipe!r}; choose lbfgs or sgd")
        if self.train not in ("auto", "vmap", "loop"):
            raise AuditError(f"train must be auto, vmap or loop, got {self.train!r}")
        if self.pool is not None and self.pool < 8:
            raise AuditError(f"--pool must be >= 8, got {self.pool}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise AuditError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.lr is not None and not self.lr > 0:
            raise AuditError(f"--lr must be > 0, got {self.lr}")
        if self.epochs is not None and self.epochs < 1:
            raise AuditError(f"--epochs must be >= 1, got {self.epochs}")


# --------------------------------------------------------------------------- shadow training


def assign(n_pool: int, targets: Tensor, shadows: int, seed: int) -> Tensor:
    """``[shadows, n_pool]`` bool: which pool rows each shadow trains on.

    Every shadow gets exactly ``n_pool // 2`` rows; every target is in exactly ``shadows / 2``
    shadows (a random half, per target); non-targets fill the rest at random.
    """
    g = torch.Generator().manual_seed(int(seed))
    m = n_pool // 2
    k = int(targets.numel())
    half = shadows // 2
    if k > n_pool - 1 or m - k < 0:
        raise AuditError(f"{k} targets do not fit a pool of {n_pool} (at most half the pool)")
    inside = torch.zeros(shadows, n_pool, dtype=torch.bool)
    for t in targets.tolist():
        inside[torch.randperm(shadows, generator=g)[:half], t] = True
    is_target = torch.zeros(n_pool, dtype=torch.bool)
    is_target[targets] = True
    others = torch.nonzero(~is_target).reshape(-1)
    for s in range(shadows):
        need = m - int(inside[s].sum())
        if need > others.numel():
            raise AuditError(f"pool of {n_pool} too small for {k} targets")
        inside[s, others[torch.randperm(others.numel(), generator=g)[:need]]] = True
    return inside


def _batch_loss(base: nn.Module):
    """``(params, xb, yb) -> mean cross-entropy`` of ``base`` run with ``params`` (weight decay
    is added in the update, as plain SGD's ``weight_decay`` does)."""
    from torch.func import functional_call

    def loss(params: dict, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(base, params, (xb,)), yb)

    return loss


def _train_vmap(models: list[nn.Module], X: Tensor, y: Tensor, rows: list[Tensor],
                recipes: list[M.Recipe], progress: bool) -> None:
    """SGD (no momentum, weight decay, step-decayed lr) on all ``models`` at once.

    ``rows[s]`` are shadow ``s``'s training rows (equal sizes); its batches follow
    ``models.batch_schedule(len(rows[s]), recipes[s])`` -- the same sequence ``models.train``
    would take -- so the result matches training each model alone up to float rounding.
    """
    import copy

    from torch.func import grad, stack_module_state, vmap

    n = int(rows[0].numel())
    if any(int(r.numel()) != n for r in rows):
        raise AuditError("vmap training needs equal training-set sizes")
    rec0 = recipes[0]
    params, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    dtype = next(models[0].parameters()).dtype
    Xc, yc = X.to(dtype), y.to(torch.long)
    scheds = [M.batch_schedule(n, r) for r in recipes]
    spe = M.steps_per_epoch(n, rec0)
    g_fn = vmap(grad(_batch_loss(base)), in_dims=(0, 0, 0))
    wd = float(rec0.weight_decay)
    rows_stacked = torch.stack(rows)  # [S, n]
    steps = range(len(scheds[0]))
    if progress:
        steps = tqdm(steps, desc="mini_unlearn: shadow SGD (vmap)", unit="step", leave=False)
    for t in steps:
        lr = M.lr_at_epoch(rec0, t // spe)
        b = torch.stack([sc[t] for sc in scheds])  # [S, B] positions within each shadow's rows
        gidx = torch.gather(rows_stacked, 1, b)
        grads = g_fn(params, Xc[gidx], yc[gidx])
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(lr * (grads[k] + wd * p))
    with torch.no_grad():
        for s, model in enumerate(models):
            for k, p in model.named_parameters():
                p.copy_(params[k][s])


def train_shadows(make: list, X: Tensor, y: Tensor, rows: list[Tensor], recipes: list[M.Recipe],
                  how: str = "auto", progress: bool = False, step_callbacks: list | None = None
                  ) -> tuple[list[nn.Module], float, str]:
    """Train one model per ``make[s]()`` on ``X[rows[s]]``; returns ``(models, seconds, how)``.

    ``step_callbacks``: ``(models) -> list of per-model step callbacks`` for ``models.train``
    (recording for Mini-Unlearning's trajectory mode); it forces the loop.

    ``how``: ``"vmap"`` (all at once, SGD recipes only), ``"loop"`` (``models.train`` one after
    the other) or ``"auto"`` (vmap for SGD recipes, where it measured as fast or faster).
    """
    sgd = recipes[0].name == "sgd"
    if how == "vmap" and not sgd:
        raise AuditError("vmap shadow training needs an SGD recipe (--recipe sgd)")
    models = [mk() for mk in make]
    callbacks = step_callbacks(models) if step_callbacks is not None else None
    if callbacks is not None:
        how = "loop"
    if how == "auto":
        how = "vmap" if sgd else "loop"
    M._warm_up_optim()
    t0 = time.perf_counter()
    if how == "vmap":
        _train_vmap(models, X, y, rows, recipes, progress)
    else:
        it = range(len(models))
        if progress:
            it = tqdm(it, desc="mini_unlearn: shadows", unit="model", leave=False)
        for s in it:
            M.train(models[s], X[rows[s]], y[rows[s]], recipes[s],
                    step_callback=callbacks[s] if callbacks is not None else None)
    return models, time.perf_counter() - t0, how


# --------------------------------------------------------------------------- the attack


@torch.no_grad()
def lira_scores(model: nn.Module, X: Tensor, y: Tensor) -> np.ndarray:
    """``φ = log p_y − log(1 − p_y) = z_y − logsumexp_{j≠y} z_j`` per sample (float64)."""
    z = model(X.to(next(model.parameters()).dtype)).double()
    y = y.to(torch.long).reshape(-1, 1)
    zy = z.gather(1, y).reshape(-1)
    others = z.scatter(1, y, float("-inf"))
    return (zy - torch.logsumexp(others, dim=1)).numpy()


def _log_normal(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)


def ulira_attack(scores: np.ndarray, inside: np.ndarray,
                 per_example_variance: bool | None = None, seed: int = 0) -> dict:
    """Leave-one-shadow-out likelihood-ratio attack.

    Args:
        scores: ``[N, k]`` φ of every target on every shadow's (unlearned) model.
        inside: ``[N, k]`` bool, shadow ``s`` trained on (and unlearned) target ``x``.
        per_example_variance: per-example (True) or pooled per group (False) variances;
            ``None``: per-example when every leave-one-out group has at least
            :data:`PER_EXAMPLE_VARIANCE_MIN` members.
        seed: picks the extra shadow left out of the other group (see below).

    For each attacked shadow ``s`` and target ``x``, the Gaussians are fitted on the other
    shadows minus one random shadow of the group ``s`` is not in, so both groups have
    ``N/2 − 1`` members (unequal sizes would bias the attack below 0.5 when the groups are
    exchangeable, as after exact retraining).

    Returns ``{"accuracy", "auc", "log_lr": [N, k] list, "per_example_variance"}``; the
    accuracy is that of predicting "unlearned" when ``log LR > 0``.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    N, k = scores.shape
    n_in = inside.sum(0)
    if (n_in < 3).any() or (N - n_in < 3).any():
        raise AuditError("every target needs at least 3 shadows with and 3 without it")
    smallest = int(min(n_in.min(), (N - n_in).min())) - 1
    if per_example_variance is None:
        per_example_variance = smallest >= PER_EXAMPLE_VARIANCE_MIN
    eps = 1e-8
    rng = np.random.default_rng(seed)
    log_lr = np.empty((N, k))
    for s in range(N):
        # Leave shadow s out, and one random shadow of the other group, so both groups keep
        # N/2 - 1 members whatever s's label: with unequal group sizes a leave-one-out attack
        # is biased below 0.5 on exchangeable groups (the smaller group's mean is noisier).
        keep = np.ones((N, k), dtype=bool)
        keep[s] = False
        for x in range(k):
            other = np.nonzero((inside[:, x] != inside[s, x]))[0]
            keep[rng.choice(other), x] = False
        ins, outs = inside & keep, ~inside & keep
        cnt_in, cnt_out = ins.sum(0), outs.sum(0)
        mu_in = np.where(ins, scores, 0).sum(0) / cnt_in
        mu_out = np.where(outs, scores, 0).sum(0) / cnt_out
        r_in = np.where(ins, scores - mu_in, 0) ** 2
        r_out = np.where(outs, scores - mu_out, 0) ** 2
        if per_example_variance:
            var_in = r_in.sum(0) / np.maximum(cnt_in - 1, 1) + eps
            var_out = r_out.sum(0) / np.maximum(cnt_out - 1, 1) + eps
        else:
            var_in = np.full(k, r_in.sum() / max(int(cnt_in.sum()) - k, 1) + eps)
            var_out = np.full(k, r_out.sum() / max(int(cnt_out.sum()) - k, 1) + eps)
        log_lr[s] = _log_normal(scores[s], mu_in, var_in) - _log_normal(scores[s], mu_out, var_out)
    labels = inside.reshape(-1).astype(int)
    flat = log_lr.reshape(-1)
    return {"accuracy": float(((flat > 0).astype(int) == labels).mean()),
            "auc": float(roc_auc_score(labels, flat)),
            "per_example_variance": bool(per_example_variance)}


# --------------------------------------------------------------------------- the audit


def run_audit(cfg: AuditConfig, progress: bool = True) -> dict:
    """Train the shadows once, then per method unlearn every shadow's targets and attack.

    Returns a JSON-able dict: ``config``, ``dataset``, ``shadow_training`` (how, seconds),
    ``methods`` (per method: ``accuracy``, ``auc``, ``seconds`` of unlearning all shadows,
    mean ``forget_acc`` / ``test_acc`` of the unlearned shadows).
    """
    import copy

    from .recorder import Recorder
    from .unlearn import unlearn

    cfg.validate()
    ds = load_dataset(cfg.data, seed=cfg.seed)
    X, y = ds.X_train, ds.y_train
    if cfg.pool is not None:
        if cfg.pool > ds.n_train:
            raise AuditError(f"--pool {cfg.pool} exceeds the {ds.n_train} training rows")
        X, y = X[:cfg.pool], y[:cfg.pool]
    n_pool = int(X.shape[0])
    if cfg.targets > n_pool // 2:
        raise AuditError(f"--targets {cfg.targets} exceeds half the pool ({n_pool // 2})")
    g = torch.Generator().manual_seed(cfg.seed + 7)
    targets = torch.sort(torch.randperm(n_pool, generator=g)[:cfg.targets]).values
    inside = assign(n_pool, targets, cfg.shadows, cfg.seed + 11)
    rows = [torch.nonzero(inside[s]).reshape(-1) for s in range(cfg.shadows)]
    base_recipe = M.default_recipe(cfg.model, cfg.recipe)
    if cfg.epochs is not None:
        base_recipe.epochs = cfg.epochs
    if cfg.weight_decay is not None:
        base_recipe.weight_decay = float(cfg.weight_decay)
    if cfg.lr is not None:
        base_recipe.lr = float(cfg.lr)
    recipes = []
    for s in range(cfg.shadows):
        r = copy.deepcopy(base_recipe)
        r.seed = 1000 * cfg.seed + s
        recipes.append(r)

    def maker(s: int):
        return lambda: M.make_model(cfg.model, ds.num_features, ds.num_classes,
                                    seed=1000 * cfg.seed + 500 + s)

    makes = [maker(s) for s in range(cfg.shadows)]
    # Mini-Unlearning's trajectory mode needs the SGD run recorded (K = 10 checkpoints, as
    # `mini-unlearn run`): then the shadows train one by one with a Recorder each.
    sgd = base_recipe.name == "sgd"
    record = sgd and any(m in ("mini", "mini_retain") for m in cfg.methods)
    recorders: list = []

    def attach(models):
        for s, model in enumerate(models):
            steps = len(M.batch_schedule(int(rows[s].numel()), recipes[s]))
            recorders.append(Recorder(model, checkpoints=RECORD_CHECKPOINTS, total_steps=steps))
        return [lambda lr, indices=None, rec=rec: rec.step(lr) for rec in recorders]

    shadows, train_seconds, how = train_shadows(makes, X, y, rows, recipes, cfg.train, progress,
                                                step_callbacks=attach if record else None)
    n_val = max(1, ds.n_test // 5)
    val = (ds.X_test[:n_val], ds.y_test[:n_val])
    test = (ds.X_test[n_val:], ds.y_test[n_val:])
    # Per shadow: its training data, the targets it trained on (positions in its rows), a log.
    per = []
    for s, model in enumerate(shadows):
        Xs, ys = X[rows[s]], y[rows[s]]
        is_t = torch.isin(rows[s], targets)
        f_local = torch.nonzero(is_t).reshape(-1)
        r_local = torch.nonzero(~is_t).reshape(-1)
        rec = recorders[s] if record else Recorder(model, checkpoints=0)
        log = rec.finalize((Xs, ys), M.loss_fn, weight_decay=recipes[s].weight_decay,
                           progress=False)
        per.append(dict(Xs=Xs, ys=ys, f=f_local, r=r_local, log=log))
    t_inside = inside[:, targets].numpy()  # [N, k]
    Xt, yt = X[targets], y[targets]

    out_methods: dict = {}
    bar = tqdm(total=len(cfg.methods) * cfg.shadows, desc="mini_unlearn: audit unlearning",
               unit="run", disable=not progress)
    try:
        for name in cfg.methods:
            scores = np.empty((cfg.shadows, cfg.targets))
            seconds, f_acc, te_acc = 0.0, [], []
            for s, model in enumerate(shadows):
                p = per[s]
                if name == "original":
                    um = model
                else:
                    retain = (p["Xs"][p["r"]], p["ys"][p["r"]])
                    kw: dict = dict(indices=p["f"], train_data=(p["Xs"], p["ys"]),
                                    loss_fn=M.loss_fn, log=p["log"])
                    if name == "mini":
                        kw.update(method="mini", mode="auto")
                    elif name == "mini_retain":
                        kw.update(method="mini", mode="auto", retain=retain, repair_epochs=2)
                    elif name == "retrain":
                        kw.update(method="retrain", recipe=recipes[s], make_model=makes[s],
                                  retain_indices=p["r"])
                    elif name == "nabla_tau":
                        kw.update(method="nabla_tau", retain=retain, val=val)
                    elif name in ("finetune", "neggrad"):
                        kw.update(method=name, retain=retain, recipe=recipes[s])
                    else:
                        kw.update(method=name, retain=retain, seed=s)
                    res = unlearn(model, **kw)
                    um, seconds = res.model, seconds + res.seconds
                scores[s] = lira_scores(um, Xt, yt)
                with torch.no_grad():
                    fx, fy = p["Xs"][p["f"]], p["ys"][p["f"]]
                    f_acc.append(float((um(fx).argmax(1) == fy).double().mean()))
                    te_acc.append(float((um(test[0]).argmax(1) == test[1]).double().mean()))
                bar.update(1)
            att = ulira_attack(scores, t_inside)
            out_methods[name] = {**att, "seconds": seconds,
                                 "forget_acc": float(np.mean(f_acc)), "test_acc": float(np.mean(te_acc))}
    finally:
        bar.close()
    return {
        "config": {**asdict(cfg), "methods": list(cfg.methods), "recipe": base_recipe.to_dict()},
        "dataset": {"name": ds.name, "n_pool": n_pool, "shadow_train_size": int(rows[0].numel()),
                    "targets": cfg.targets, "forget_per_shadow": float(t_inside.sum(1).mean())},
        "shadow_training": {"how": how, "seconds": train_seconds},
        "methods": out_methods,
    }


def format_audit_table(result: dict) -> str:
    """One row per method: U-LiRA accuracy and AUC (0.5 ideal), unlearning seconds (all
    shadows), mean forget / test accuracy of the unlearned shadows."""
    head = f"{'method':14s}{'U-LiRA acc':>12s}{'AUC':>8s}{'seconds':>10s}{'forget':>9s}{'test':>8s}"
    lines = [head, "-" * len(head)]
    for name, m in result["methods"].items():
        lines.append(f"{name:14s}{m['accuracy']:12.3f}{m['auc']:8.3f}{m['seconds']:10.2f}"
                     f"{m['forget_acc']:9.3f}{m['test_acc']:8.3f}")
    d, st = result["dataset"], result["shadow_training"]
    lines.append(f"[{d['name']}: {result['config']['shadows']} shadows on {d['shadow_train_size']} of "
                 f"{d['n_pool']} each, {d['targets']} targets (~{d['forget_per_shadow']:.0f} forgotten "
                 f"per shadow); shadows trained by {st['how']} in {st['seconds']:.1f} s; 0.5 is ideal, "
                 f"retrain is the floor, original the ceiling]")
    return "\n".join(lines)
