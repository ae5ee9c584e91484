"""Models, training recipes and the training loops the unlearning methods replay.

The objective everywhere is ``F(w) = mean cross-entropy + (weight_decay / 2) * ||w||^2`` over
**all** parameters (weights and biases) -- the ``F`` of DESIGN §2.

- :func:`make_model`: ``"logreg"`` (one ``nn.Linear``) or ``"mlp"`` (Linear-ReLU-Linear, 128
  hidden units), initialised deterministically from a seed without touching the global RNG.
- :class:`Recipe` / :func:`default_recipe`: how a model is trained. ``"lbfgs"``: full-batch
  L-BFGS (strong Wolfe) run to a tight gradient-norm tolerance -- a converged model, for the
  one-shot and refresh modes. ``"sgd"``: plain minibatch SGD (no momentum) with step decay
  following a seeded :func:`batch_schedule` -- training not run to convergence, for the
  trajectory mode.
- :func:`train`: runs a recipe. With ``indices`` (the retained rows) it retrains on a subset;
  for SGD it replays the *same* batch sequence minus the removed samples
  (:func:`retain_schedule`), which is what "retraining with the same recipe and seed" means.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_model", "Recipe", "default_recipe", "batch_schedule", "retain_schedule",
           "lr_at_epoch", "train", "loss_fn", "objective", "objective_and_grad", "MODEL_KINDS"]

MODEL_KINDS = ("logreg", "mlp")
HIDDEN = 128


def make_model(kind: str, in_features: int, num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised classifier (float32), deterministic in ``seed``.

    ``"logreg"``: ``nn.Linear(in_features, num_classes)`` (multinomial logistic regression).
    ``"mlp"``: ``Linear(in_features, 128) - ReLU - Linear(128, num_classes)``.
    PyTorch's default initialisation, drawn from ``seed`` in a forked RNG (the global RNG state is
    left as it was).
    """
    if in_features < 1 or num_classes < 2:
        raise ValueError(f"need in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if kind == "logreg":
            model: nn.Module = nn.Linear(int(in_features), int(num_classes))
        elif kind == "mlp":
            model = nn.Sequential(nn.Linear(int(in_features), HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, int(num_classes)))
        else:
            raise ValueError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
    return model


@dataclass
class Recipe:
    """How to train.

    Attributes:
        name: ``"lbfgs"`` (full batch, to convergence) or ``"sgd"`` (minibatch, fixed epochs).
        weight_decay: ``lambda`` of ``(lambda/2) ||w||^2`` over all parameters.
        epochs: SGD epochs (ignored by L-BFGS).
        batch_size: SGD minibatch size; ``None`` = full batch.
        lr: SGD initial learning rate; L-BFGS initial step length (1.0).
        lr_decay_epochs: step decay: ``lr *= gamma`` every this many epochs (``None``: constant).
        gamma: the decay factor.
        seed: seeds the batch order (the model's init has its own seed, see :func:`make_model`).
        max_iter: L-BFGS iteration budget (total).
        tol: L-BFGS stops when ``||grad F(w)|| <= tol * ||grad F(w_0)||``.
        history_size: L-BFGS memory.
        polish_float64: L-BFGS on a float32 model: when float32 stalls above ``tol``, finish on a
            float64 copy and copy the result back (rounded to float32).
    """

    name: Literal["lbfgs", "sgd"]
    weight_decay: float
    epochs: int = 1
    batch_size: int | None = None
    lr: float = 1.0
    lr_decay_epochs: int | None = None
    gamma: float = 1.0
    seed: int = 0
    max_iter: int = 2000
    tol: float = 1e-7
    history_size: int = 20
    polish_float64: bool = True

    def __post_init__(self) -> None:
        if self.name not in ("lbfgs", "sgd"):
            raise ValueError(f"unknown recipe {self.name!r}; use 'lbfgs' or 'sgd'")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.name == "sgd":
            if self.epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {self.epochs}")
            if self.batch_size is not None and self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
            if not self.lr > 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_decay_epochs is not None and self.lr_decay_epochs < 1:
            raise ValueError(f"lr_decay_epochs must be >= 1 or None, got {self.lr_decay_epochs}")

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-able), e.g. to store with a log."""
        return asdict(self)


def default_recipe(kind: str, name: str | None = None) -> Recipe:
    """The recipe used throughout the benchmarks.

    ``"logreg"`` -> L-BFGS, ``weight_decay=1e-2``, full batch, ``tol=1e-7`` (relative gradient
    norm; a float32 run that stalls above it is finished in float64 -- see :func:`train`).
    ``"mlp"`` -> SGD, ``weight_decay=1e-3``, batch 64, 20 epochs, lr 0.1 halved every 5 epochs.
    ``name="sgd"`` with ``"logreg"`` gives logistic regression trained by the SGD schedule
    (``weight_decay=1e-2``), for the trajectory mode.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
    name = name or ("lbfgs" if kind == "logreg" else "sgd")
    wd = 1e-2 if kind == "logreg" else 1e-3
    if name == "lbfgs":
        return Recipe("lbfgs", weight_decay=wd, epochs=1, batch_size=None, lr=1.0, max_iter=2000,
                      tol=1e-7, history_size=20)
    if name == "sgd":
        return Recipe("sgd", weight_decay=wd, epochs=20, batch_size=64, lr=0.1, lr_decay_epochs=5,
                      gamma=0.5)
    raise ValueError(f"unknown recipe {name!r}; use 'lbfgs' or 'sgd'")


def lr_at_epoch(recipe: Recipe, epoch: int) -> float:
    """Step-decayed learning rate of ``epoch`` (0-based): ``lr * gamma ** (epoch // lr_decay_epochs)``."""
    if recipe.lr_decay_epochs is None:
        return float(recipe.lr)
    return float(recipe.lr * recipe.gamma ** (epoch // recipe.lr_decay_epochs))


def batch_schedule(n_train: int, recipe: Recipe) -> list[Tensor]:
    """The seeded minibatch sequence over all epochs: one int64 index tensor per step.

    Each epoch is a fresh permutation (from one generator seeded with ``recipe.seed``) cut into
    batches of ``recipe.batch_size`` (the last one may be smaller). Full batch (``None`` or
    ``>= n_train``): one batch ``arange(n_train)`` per epoch. Batch ``k`` of epoch ``e`` is
    element ``e * ceil(n_train / batch_size) + k``.
    """
    n_train = int(n_train)
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    bs = recipe.batch_size
    if bs is None or bs >= n_train:
        return [torch.arange(n_train) for _ in range(recipe.epochs)]
    g = torch.Generator().manual_seed(int(recipe.seed))
    out: list[Tensor] = []
    for _ in range(recipe.epochs):
        perm = torch.randperm(n_train, generator=g)
        out.extend(perm.split(bs))
    return out


def steps_per_epoch(n_train: int, recipe: Recipe) -> int:
    """Number of minibatches per epoch of :func:`batch_schedule`."""
    bs = recipe.batch_size
    return 1 if bs is None or bs >= n_train else -(-int(n_train) // bs)


def retain_schedule(schedule: list[Tensor], forget_idx: Tensor) -> list[Tensor]:
    """``schedule`` with the forget indices removed from every batch (order kept).

    Batches that become empty are dropped, so the result may be shorter; use
    :func:`retain_schedule_with_steps` to know which original step each batch came from.
    """
    return [b for _, b in retain_schedule_with_steps(schedule, forget_idx)]


def retain_schedule_with_steps(schedule: list[Tensor], forget_idx: Tensor) -> list[tuple[int, Tensor]]:
    """Like :func:`retain_schedule`, as ``(original_step, batch)`` pairs."""
    forget_idx = torch.as_tensor(forget_idx, dtype=torch.long).reshape(-1)
    out: list[tuple[int, Tensor]] = []
    for t, b in enumerate(schedule):
        keep = b[~torch.isin(b, forget_idx)] if forget_idx.numel() else b
        if keep.numel():
            out.append((t, keep))
    return out


def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (the data term of the objective)."""
    return F.cross_entropy(outputs, targets)


def _sq_norm(params: list[Tensor]) -> Tensor:
    return sum((p * p).sum() for p in params)  # type: ignore[return-value]


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def objective(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float) -> float:
    """``F(w) = mean CE(model(X), y) + (weight_decay/2) ||w||^2`` over all parameters (a float)."""
    with torch.no_grad():
        X = X.to(_model_dtype(model))
        loss = loss_fn(model(X), y) + 0.5 * weight_decay * _sq_norm(list(model.parameters()))
    return float(loss)


def objective_and_grad(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float
                       ) -> tuple[float, Tensor]:
    """``F(w)`` and its gradient flattened over all parameters (in ``model.parameters()`` order).

    Leaves the parameters' ``.grad`` untouched.
    """
    params = [p for p in model.parameters()]
    X = X.to(_model_dtype(model))
    with torch.enable_grad():
        loss = loss_fn(model(X), y) + 0.5 * weight_decay * _sq_norm(params)
        grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def _lbfgs_run(model: nn.Module, X: Tensor, y: Tensor, recipe: Recipe, target: float,
               max_iter: int, bar) -> tuple[int, float, float, float, bool]:
    """L-BFGS rounds until ``||grad F|| <= target``, the budget, or a stall.

    Returns ``(iterations, F, ||grad F||, initial ||grad F||, converged)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    wd = float(recipe.weight_decay)
    inner = 50
    opt = torch.optim.LBFGS(params, lr=recipe.lr, max_iter=inner, max_eval=inner * 5 // 4,
                            tolerance_grad=0.0, tolerance_change=0.0,
                            history_size=recipe.history_size, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        # The value is accumulated in float64 (logits and ||w||^2 upcast), so near the optimum
        # its changes stay above rounding and the Wolfe tests keep working.
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(X).double(), y) + 0.5 * wd * _sq_norm([p.double() for p in params])
        loss.backward()
        return loss.detach()

    def value_and_norm() -> tuple[float, float]:
        loss = closure()
        g = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))  # type: ignore[union-attr]
        return float(loss), float(g)

    f, g_init = value_and_norm()
    gn, converged, stalls = g_init, g_init <= target, 0
    best = (f, gn)
    iters = 0
    while not converged and iters < max_iter:
        if not (math.isfinite(f) and math.isfinite(gn)):
            from .errors import NonFiniteError
            raise NonFiniteError(f"L-BFGS objective became non-finite (F={f}, |g|={gn}) after "
                                 f"{iters} iterations")
        opt.param_groups[0]["max_iter"] = min(inner, max_iter - iters)
        opt.step(closure)
        state = opt.state[params[0]]
        new_iters = int(state.get("n_iter", 0))
        done_now, iters = new_iters - iters, new_iters
        f, gn = value_and_norm()
        if bar is not None:
            bar.update(done_now)
            bar.set_postfix(loss=f"{f:.6g}", grad=f"{gn:.2e}", dtype=str(params[0].dtype)[6:])
        converged = gn <= target
        # Stalled: a round improved neither the loss nor (by half) the gradient norm -- the
        # precision limit. Restart the memory; give up after three such rounds.
        if f < best[0] or gn < 0.5 * best[1]:
            best, stalls = (min(f, best[0]), min(gn, best[1])), 0
        else:
            stalls += 1
            state["old_dirs"], state["old_stps"], state["ro"] = [], [], []
            if stalls >= 3 or done_now == 0:
                break
    opt.zero_grad(set_to_none=True)
    return iters, f, gn, g_init, bool(converged)


def _train_lbfgs(model: nn.Module, X: Tensor, y: Tensor, recipe: Recipe, progress: bool) -> dict:
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.max_iter, desc="lbfgs", unit="it")
    try:
        _, g0 = objective_and_grad(model, X, y, recipe.weight_decay)
        g0n = max(float(g0.norm()), 1e-30)
        target = recipe.tol * g0n
        iters, f, gn, _, converged = _lbfgs_run(model, X, y, recipe, target, recipe.max_iter, bar)
        polished = False
        dtype = _model_dtype(model)
        if (not converged and recipe.polish_float64 and dtype in (torch.float32, torch.float16,
                                                                   torch.bfloat16)
                and iters < recipe.max_iter):
            # Low precision stalled above tol (typically ~1e-5 relative in float32): finish on a
            # float64 copy and round back, which lands within float32 rounding of the optimum.
            m64 = copy.deepcopy(model).double()
            it64, _, gn64, _, conv64 = _lbfgs_run(m64, X.double(), y, recipe, target,
                                                  recipe.max_iter - iters, bar)
            with torch.no_grad():
                for p, q in zip(model.parameters(), m64.parameters()):
                    p.copy_(q)
            iters += it64
            polished, converged = True, conv64
            f, g = objective_and_grad(model, X, y, recipe.weight_decay)
            gn = float(g.norm())
    finally:
        if bar is not None:
            bar.close()
    return {"steps": iters, "final_loss": f, "grad_norm": gn, "grad_norm_rel": gn / g0n,
            "converged": bool(converged), "polished_float64": polished}


def _train_sgd(model: nn.Module, X: Tensor, y: Tensor, recipe: Recipe, indices: Tensor | None,
               step_callback: Callable[..., None] | None, progress: bool) -> dict:
    n = int(X.shape[0])
    schedule = batch_schedule(n, recipe)
    spe = steps_per_epoch(n, recipe)
    if indices is None:
        steps = list(enumerate(schedule))
    else:
        mask = torch.ones(n, dtype=torch.bool)
        mask[indices] = False
        steps = retain_schedule_with_steps(schedule, torch.nonzero(mask).reshape(-1))
    params = [p for p in model.parameters() if p.requires_grad]
    # Plain SGD's weight_decay adds wd * w to the gradient: the gradient of (wd/2)||w||^2.
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=0.0, weight_decay=recipe.weight_decay)
    it = steps
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(steps, desc="sgd", unit="step")
    last = float("nan")
    for t, b in it:
        lr = lr_at_epoch(recipe, t // spe)
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(X[b]), y[b])
        loss.backward()
        if step_callback is not None:
            step_callback(lr, indices=b)
        opt.step()
        last = float(loss.detach())
        if not math.isfinite(last):
            from .errors import NonFiniteError
            raise NonFiniteError(f"SGD loss became non-finite at step {t} (lr {lr}); lower the lr")
    opt.zero_grad(set_to_none=True)
    return {"steps": len(steps), "last_batch_loss": last}


_OPTIM_WARM = False


def _warm_up_optim() -> None:
    """The first ``optimizer.step()`` in a process lazily imports torch's compiler stack (about
    2 s); do it once before any timer starts so ``seconds`` measures training only."""
    global _OPTIM_WARM
    if not _OPTIM_WARM:
        p = torch.zeros(1, requires_grad=True)
        p.grad = torch.zeros(1)
        torch.optim.SGD([p], lr=0.0).step()
        _OPTIM_WARM = True


def train(model: nn.Module, X: Tensor, y: Tensor, recipe: Recipe, *, indices: Tensor | None = None,
          step_callback: Callable[..., None] | None = None, progress: bool = False) -> dict:
    """Train ``model`` in place on ``(X, y)`` with ``recipe``; return stats.

    Args:
        model: any module mapping ``X`` to logits; float32 or float64 (``X`` is cast to its dtype).
        X, y: the full training set (``y`` int64 class labels).
        recipe: see :class:`Recipe`.
        indices: train on these rows only (retraining on the retained set). For SGD the batch
            sequence is that of the full training set with the other rows removed, so retraining
            replays the original run minus the forget samples.
        step_callback: SGD only; ``step_callback(lr, indices=batch)`` after ``loss.backward()``
            and before ``opt.step()`` on every step (``.grad`` then holds the minibatch gradient of
            the mean loss, without weight decay; ``lr`` is that step's decayed rate; ``batch`` the
            int64 tensor of the minibatch's rows in the numbering of the full ``X``, also when
            retraining on ``indices``). ``Recorder.step`` fits as is (``history="all"`` needs the
            batch). Not called by L-BFGS (a converged run needs only its end point).
        progress: show a tqdm bar.

    Returns:
        ``{"seconds", "steps", "final_loss", ...}``: ``final_loss`` is the regularised objective
        ``F`` on the training rows at the end. L-BFGS adds ``grad_norm`` (``||grad F||``),
        ``grad_norm_rel`` (÷ its initial value), ``converged`` (reached ``tol``) and
        ``polished_float64``. Float32 L-BFGS stalls near 1e-5 relative on MNIST; with
        ``recipe.polish_float64`` (default) it then finishes on a float64 copy and rounds back
        (float32 rounding of the optimum leaves ~1e-7 relative). SGD adds ``last_batch_loss``.
        ``seconds`` covers the optimisation only (not the final ``F`` evaluation).
    """
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    dtype = _model_dtype(model)
    X = X.to(dtype)
    y = y.to(torch.long)
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() == 0:
            raise ValueError("indices is empty: nothing to train on")
        if int(indices.min()) < 0 or int(indices.max()) >= X.shape[0]:
            raise ValueError(f"indices out of range [0, {X.shape[0]})")
    _warm_up_optim()
    t0 = time.perf_counter()
    if recipe.name == "lbfgs":
        Xs, ys = (X, y) if indices is None else (X[indices], y[indices])
        stats = _train_lbfgs(model, Xs, ys, recipe, progress)
    else:
        stats = _train_sgd(model, X, y, recipe, indices, step_callback, progress)
    stats["seconds"] = time.perf_counter() - t0
    if recipe.name == "sgd":
        Xs, ys = (X, y) if indices is None else (X[indices], y[indices])
        stats["final_loss"] = objective(model, Xs, ys, recipe.weight_decay)
    return stats
