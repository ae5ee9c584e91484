"""Models, training recipes and the training loops the unlearning methods replay.

The objective everywhere is ``F(w) = mean cross-entropy + (weight_decay / 2) * ||w||^2`` over
**all** parameters (weights and biases) -- the ``F`` of docs/math.md

- :func:`make_model`: ``"logreg"`` (one ``nn.Linear``), ``"mlp"`` (Linear-ReLU-Linear, 128
  hidden units), ``"cnn"`` (a tiny conv net for fast tests), ``"resnet"`` (a small
  pre-activation ResNet, 16/32/64 channels) and ``"gpt"`` (a small decoder-only transformer,
  :mod:`mini_unlearn.gpt`), initialised deterministically from a seed without touching the
  global RNG. Image models take the flattened rows of the data sets and reshape internally.
- :class:`Recipe` / :func:`default_recipe`: how a model is trained. ``"lbfgs"``: full-batch
  L-BFGS (strong Wolfe) run to a tight gradient-norm tolerance -- a converged model, for the
  one-shot and refresh modes. ``"sgd"``: minibatch training following a seeded
  :func:`batch_schedule` with the optimizer of ``Recipe.optimizer`` -- plain SGD (step decay,
  the original trajectory-mode recipe), SGD with momentum 0.9 or AdamW, with a step or cosine
  schedule and optional linear warm-up.
- :func:`train`: runs a recipe. With ``indices`` (the retained rows) it retrains on a subset;
  for SGD it replays the *same* batch sequence minus the removed samples
  (:func:`retain_schedule`), which is what "retraining with the same recipe and seed" means.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_model", "Recipe", "default_recipe", "batch_schedule", "retain_schedule",
           "lr_at_epoch", "lr_at_step", "train", "loss_fn", "objective", "objective_and_grad",
           "image_shape", "PreActResNet", "make_optimizer", "MODEL_KINDS", "OPTIMIZERS", "SCHEDULES"]

MODEL_KINDS = ("logreg", "mlp", "cnn", "resnet", "gpt")
#: ``Recipe.optimizer`` values (minibatch recipes).
OPTIMIZERS = ("sgd", "momentum", "adamw")
#: ``Recipe.schedule`` values.
SCHEDULES = ("step", "cosine")
HIDDEN = 128
#: ``"cnn"`` channels of its two conv layers.
CNN_CHANNELS = (8, 16)
#: ``"resnet"`` channels of its three stages.
RESNET_WIDTHS = (16, 32, 64)


def image_shape(in_features: int) -> tuple[int, int, int]:
    """The ``(C, H, W)`` an image model reads a flattened row of ``in_features`` as.

    ``3072`` -> ``(3, 32, 32)``; a square ``s * s`` -> ``(1, s, s)`` (784 -> 1x28x28, 64 ->
    1x8x8); ``3 * s * s`` -> ``(3, s, s)``. Anything else raises :class:`ValueError` (pass
    ``input_shape=(C, H, W)`` to :func:`make_model` instead).
    """
    d = int(in_features)
    if d == 3072:
        return (3, 32, 32)
    s = math.isqrt(d)
    if s * s == d:
        return (1, s, s)
    if d % 3 == 0:
        s = math.isqrt(d // 3)
        if 3 * s * s == d:
            return (3, s, s)
    raise ValueError(f"cannot read {d} features as a square image (1xSxS or 3xSxS); pass "
                     f"input_shape=(C, H, W) to make_model")


class _PreActBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut (a
    1x1 conv on the pre-activated input where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """A small pre-activation ResNet for flattened image rows.

    ``[B, C*H*W]`` (or ``[B, C, H, W]``) -> conv3x3 stem (``widths[0]`` channels) -> three
    stages of ``blocks`` pre-activation blocks (``widths`` channels, stride 1/2/2) -> BN-ReLU ->
    global average pool -> ``Linear(widths[-1], num_classes)``. With ``blocks=1`` (the default)
    it is 8 weight layers deep (~78k parameters at 16/32/64); ``blocks=3`` is PreAct-ResNet-20.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 widths: tuple[int, int, int] = RESNET_WIDTHS, blocks: int = 1) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.input_shape = tuple(int(v) for v in input_shape)
        c = self.input_shape[0]
        self.stem = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_PreActBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], *self.input_shape)
        out = self.stages(self.stem(x))
        out = F.relu(self.bn(out))
        return self.fc(out.mean(dim=(2, 3)))


def _tiny_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    c1, c2 = CNN_CHANNELS
    pooled = (min(4, h), min(4, w))
    return nn.Sequential(
        nn.Unflatten(1, (c, h, w)),
        nn.Conv2d(c, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
        nn.Linear(c2 * pooled[0] * pooled[1], int(num_classes)))


def make_model(kind: str, in_features: int, num_classes: int, seed: int = 0,
               **options: Any) -> nn.Module:
    """A freshly initialised model (float32), deterministic in ``seed``.

    - ``"logreg"``: ``nn.Linear(in_features, num_classes)`` (multinomial logistic regression).
    - ``"mlp"``: ``Linear(in_features, 128) - ReLU - Linear(128, num_classes)``.
    - ``"cnn"``: conv3x3(8)-BN-ReLU, conv3x3(16, stride 2)-BN-ReLU, adaptive average pool to
      4x4, Linear: a tiny image model for fast tests.
    - ``"resnet"``: :class:`PreActResNet` (options ``widths=(16, 32, 64)``, ``blocks=1``).
    - ``"gpt"``: :class:`mini_unlearn.gpt.GPT` on ``[B, T]`` int64 tokens; ``in_features`` and
      ``num_classes`` are both the vocabulary size (256 for bytes); options are the fields of
      :class:`mini_unlearn.gpt.GPTConfig` (``seq_len``, ``d_model``, ``n_layers``, ``n_heads``,
      ``tie_weights`` ...).

    Image models (``cnn``, ``resnet``) take flattened rows ``[B, in_features]`` and reshape them
    to :func:`image_shape` (784 -> 1x28x28, 3072 -> 3x32x32; ``input_shape=(C, H, W)``
    overrides). PyTorch's default initialisation (GPT: its own), drawn from ``seed`` in a forked
    RNG (the global RNG state is left as it was). Unknown options raise :class:`TypeError`.
    """
    if in_features < 1 or num_classes < 2:
        raise ValueError(f"need in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
    allowed = {"cnn": {"input_shape"}, "resnet": {"input_shape", "widths", "blocks"}}.get(kind)
    if allowed is not None and set(options) - allowed:
        raise TypeError(f"make_model({kind!r}) got unknown option(s) {sorted(set(options) - allowed)}; "
                        f"it takes {sorted(allowed)}")
    if kind in ("logreg", "mlp") and options:
        raise TypeError(f"make_model({kind!r}) takes no options, got {sorted(options)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if kind == "logreg":
            model: nn.Module = nn.Linear(int(in_features), int(num_classes))
        elif kind == "mlp":
            model = nn.Sequential(nn.Linear(int(in_features), HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, int(num_classes)))
        elif kind in ("cnn", "resnet"):
            shape = tuple(int(v) for v in options.pop("input_shape", None) or image_shape(in_features))
            if len(shape) != 3 or math.prod(shape) != int(in_features):
                raise ValueError(f"input_shape {shape} does not hold {in_features} features")
            if kind == "cnn":
                model = _tiny_cnn(shape, int(num_classes))  # type: ignore[arg-type]
            else:
                model = PreActResNet(shape, int(num_classes), **options)  # type: ignore[arg-type]
        else:
            from .gpt import GPT, GPTConfig
            if int(in_features) != int(num_classes):
                raise ValueError(f"gpt: in_features (vocabulary) and num_classes must agree, got "
                                 f"{in_features} and {num_classes}")
            model = GPT(GPTConfig(vocab_size=int(in_features), **options))
    return model


@dataclass
class Recipe:
    """How to train.

    Attributes:
        name: ``"lbfgs"`` (full batch, to convergence) or ``"sgd"`` (minibatch, fixed epochs,
            with the optimizer named by ``optimizer``).
        weight_decay: ``lambda`` over all parameters. ``"sgd"`` and ``"momentum"`` couple it
            (``lambda * w`` added to the gradient: the gradient of ``(lambda/2) ||w||^2``);
            ``"adamw"`` decouples it (``w -= lr * lambda * w`` beside the Adam step).
        epochs: epochs of a minibatch recipe (ignored by L-BFGS).
        batch_size: minibatch size; ``None`` = full batch.
        lr: initial (peak) learning rate; L-BFGS initial step length (1.0).
        lr_decay_epochs: ``schedule="step"``: ``lr *= gamma`` every this many epochs (``None``:
            constant).
        gamma: the step-decay factor.
        seed: seeds the batch order (the model's init has its own seed, see :func:`make_model`).
        max_iter: L-BFGS iteration budget (total).
        tol: L-BFGS stops when ``||grad F(w)|| <= tol * ||grad F(w_0)||``.
        history_size: L-BFGS memory.
        polish_float64: L-BFGS on a float32 model: when float32 stalls above ``tol``, finish on a
            float64 copy and copy the result back (rounded to float32).
        optimizer: minibatch optimizer: ``"sgd"`` (plain SGD, no momentum), ``"momentum"``
            (SGD, momentum ``momentum``, not Nesterov) or ``"adamw"`` (``torch.optim.AdamW``).
        momentum: the momentum of ``"momentum"``.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's epsilon.
        schedule: ``"step"`` (see ``lr_decay_epochs``) or ``"cosine"`` (per step, from ``lr`` to
            ``lr * min_lr_ratio`` at the last step).
        min_lr_ratio: the cosine schedule's final fraction of ``lr``.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` over the first steps (0: none).
        grad_clip: clip the minibatch gradient's global norm to this before the step (``None``:
            no clipping). ``step_callback`` then sees the clipped gradient.
        max_steps: stop after this many steps of the full run (``None``: all ``epochs``); the
            schedule (:func:`batch_schedule`, the cosine) is that of the truncated run.
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
    optimizer: Literal["sgd", "momentum", "adamw"] = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["step", "cosine"] = "step"
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ("lbfgs", "sgd"):
            raise ValueError(f"unknown recipe {self.name!r}; use 'lbfgs' or 'sgd'")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if self.name == "sgd":
            if self.epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {self.epochs}")
            if self.batch_size is not None and self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
            if not self.lr > 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_decay_epochs is not None and self.lr_decay_epochs < 1:
            raise ValueError(f"lr_decay_epochs must be >= 1 or None, got {self.lr_decay_epochs}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-able), e.g. to store with a log."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


#: Minibatch recipes of :func:`default_recipe` by ``(kind, optimizer)``: the fields beyond
#: ``name="sgd"``. The ``momentum``/``adamw`` ones memorise their data set (train accuracy
#: >= 98 %): the resnet/cnn ones are sized for Fashion-MNIST, the mlp/logreg ones for MNIST-5k.
_MINIBATCH: dict[tuple[str, str], dict[str, Any]] = {
    ("logreg", "sgd"): dict(weight_decay=1e-2, epochs=20, batch_size=64, lr=0.1, lr_decay_epochs=5,
                            gamma=0.5),
    ("mlp", "sgd"): dict(weight_decay=1e-3, epochs=20, batch_size=64, lr=0.1, lr_decay_epochs=5,
                         gamma=0.5),
    ("logreg", "momentum"): dict(weight_decay=1e-3, epochs=20, batch_size=64, lr=0.05,
                                 schedule="cosine"),
    ("mlp", "momentum"): dict(weight_decay=5e-4, epochs=20, batch_size=64, lr=0.05,
                              schedule="cosine"),
    ("logreg", "adamw"): dict(weight_decay=1e-2, epochs=20, batch_size=64, lr=1e-3,
                              schedule="cosine"),
    ("mlp", "adamw"): dict(weight_decay=1e-2, epochs=20, batch_size=64, lr=3e-3, schedule="cosine"),
    ("cnn", "sgd"): dict(weight_decay=5e-4, epochs=20, batch_size=128, lr=0.1, lr_decay_epochs=8,
                         gamma=0.2),
    ("cnn", "momentum"): dict(weight_decay=5e-4, epochs=20, batch_size=128, lr=0.05,
                              schedule="cosine"),
    ("cnn", "adamw"): dict(weight_decay=5e-2, epochs=20, batch_size=128, lr=3e-3, schedule="cosine"),
    ("resnet", "sgd"): dict(weight_decay=5e-4, epochs=30, batch_size=128, lr=0.1,
                            lr_decay_epochs=10, gamma=0.2),
    ("resnet", "momentum"): dict(weight_decay=5e-4, epochs=30, batch_size=128, lr=0.05,
                                 schedule="cosine"),
    ("resnet", "adamw"): dict(weight_decay=5e-2, epochs=30, batch_size=128, lr=2e-3,
                              schedule="cosine"),
    ("gpt", "adamw"): dict(weight_decay=0.1, epochs=1, batch_size=32, lr=3e-3, betas=(0.9, 0.95),
                           schedule="cosine", min_lr_ratio=0.1, warmup_steps=50, grad_clip=1.0,
                           max_steps=1000),
    ("gpt", "momentum"): dict(weight_decay=0.0, epochs=1, batch_size=32, lr=0.1,
                              schedule="cosine", warmup_steps=50, grad_clip=1.0, max_steps=1000),
    ("gpt", "sgd"): dict(weight_decay=0.0, epochs=1, batch_size=32, lr=0.5, schedule="cosine",
                         warmup_steps=50, grad_clip=1.0, max_steps=1000),
}


def default_recipe(kind: str, name: str | None = None, optimizer: str | None = None) -> Recipe:
    """The recipe used throughout the benchmarks.

    With ``optimizer=None`` (today's defaults): ``"logreg"`` -> L-BFGS, ``weight_decay=1e-2``,
    full batch, ``tol=1e-7`` (relative gradient norm; a float32 run that stalls above it is
    finished in float64 -- see :func:`train`). ``"mlp"`` -> plain SGD, ``weight_decay=1e-3``,
    batch 64, 20 epochs, lr 0.1 halved every 5 epochs. ``name="sgd"`` with ``"logreg"`` gives
    logistic regression trained by that SGD schedule (``weight_decay=1e-2``), for the
    trajectory mode. ``"cnn"``/``"resnet"`` -> SGD with momentum, ``"gpt"`` -> AdamW.

    ``optimizer`` (``"sgd"``, ``"momentum"``, ``"adamw"``) picks a minibatch recipe
    (``name`` must then be ``None`` or ``"sgd"``); ``name="momentum"`` / ``"adamw"`` is read as
    ``optimizer``. Per model kind:

    ============  =========  ====  =====  ======  ========  ====================================
    kind          optimizer  lr    wd     batch   epochs    schedule
    ============  =========  ====  =====  ======  ========  ====================================
    mlp/logreg    momentum   0.05  5e-4*  64      20        cosine (* logreg 1e-3)
    mlp/logreg    adamw      3e-3* 1e-2   64      20        cosine (* logreg 1e-3)
    cnn           momentum   0.05  5e-4   128     20        cosine
    cnn           adamw      3e-3  5e-2   128     20        cosine
    resnet        momentum   0.05  5e-4   128     30        cosine
    resnet        adamw      2e-3  5e-2   128     30        cosine
    resnet/cnn    sgd        0.1   5e-4   128     30/20     x0.2 every 10/8 epochs
    gpt           adamw      3e-3  0.1    32      1000 st.  50 warm-up steps, cosine to 0.1 lr,
                                                            betas (0.9, 0.95), clip 1.0
    ============  =========  ====  =====  ======  ========  ====================================
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
    if name in OPTIMIZERS[1:]:
        if optimizer not in (None, name):
            raise ValueError(f"recipe {name!r} contradicts optimizer={optimizer!r}")
        name, optimizer = "sgd", name
    if name not in (None, "lbfgs", "sgd"):
        raise ValueError(f"unknown recipe {name!r}; use 'lbfgs', 'sgd', 'momentum' or 'adamw'")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    if name == "lbfgs" and optimizer is not None:
        raise ValueError("the lbfgs recipe takes no optimizer; use name='sgd' with an optimizer")
    if optimizer is None:
        if name is None:
            name = "lbfgs" if kind == "logreg" else "sgd"
            optimizer = {"cnn": "momentum", "resnet": "momentum", "gpt": "adamw"}.get(kind, "sgd")
        else:
            optimizer = "sgd" if kind in ("logreg", "mlp") else \
                {"cnn": "momentum", "resnet": "momentum", "gpt": "adamw"}[kind]
    if name == "lbfgs":
        if kind in ("cnn", "resnet", "gpt"):
            raise ValueError(f"the lbfgs recipe is for logreg/mlp, not {kind!r}")
        wd = 1e-2 if kind == "logreg" else 1e-3
        return Recipe("lbfgs", weight_decay=wd, epochs=1, batch_size=None, lr=1.0, max_iter=2000,
                      tol=1e-7, history_size=20)
    return Recipe("sgd", optimizer=optimizer, **_MINIBATCH[(kind, optimizer)])  # type: ignore[arg-type]


def lr_at_step(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Learning rate of (0-based) ``step`` of the full run (``recipe.epochs * steps_per_epoch``
    steps): warm-up, then the step decay of :func:`lr_at_epoch` or the cosine schedule.

    Cosine: ``lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)`` with ``r = min_lr_ratio`` and ``p``
    the fraction of the post-warm-up steps done (0 at the first, 1 at the last).
    """
    step = int(step)
    spe = max(1, int(steps_per_epoch))
    if recipe.warmup_steps and step < recipe.warmup_steps:
        return float(recipe.lr) * (step + 1) / recipe.warmup_steps
    if recipe.schedule == "step":
        return lr_at_epoch(recipe, step // spe)
    total = max(1, int(recipe.epochs) * spe)
    if recipe.max_steps is not None:
        total = min(total, int(recipe.max_steps))
    span = max(1, total - 1 - int(recipe.warmup_steps))
    p = min(1.0, max(0.0, (step - int(recipe.warmup_steps)) / span))
    r = float(recipe.min_lr_ratio)
    return float(recipe.lr) * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p)))


def lr_at_epoch(recipe: Recipe, epoch: int) -> float:
    """Learning rate at the start of ``epoch`` (0-based).

    Step schedule: ``lr * gamma ** (epoch // lr_decay_epochs)`` (constant without
    ``lr_decay_epochs``). Cosine: the cosine at fraction ``epoch / epochs`` of the run, ignoring
    warm-up and ``max_steps`` (so the last epoch's rate is not 0; ``lr_at_step`` gives the
    per-step rate :func:`train` uses).
    """
    if recipe.schedule == "cosine":
        r = float(recipe.min_lr_ratio)
        p = min(1.0, max(0.0, epoch / max(1, int(recipe.epochs))))
        return float(recipe.lr) * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p)))
    if recipe.lr_decay_epochs is None:
        return float(recipe.lr)
    return float(recipe.lr * recipe.gamma ** (epoch // recipe.lr_decay_epochs))


def batch_schedule(n_train: int, recipe: Recipe) -> list[Tensor]:
    """The seeded minibatch sequence over all epochs: one int64 index tensor per step.

    Each epoch is a fresh permutation (from one generator seeded with ``recipe.seed``) cut into
    batches of ``recipe.batch_size`` (the last one may be smaller). Full batch (``None`` or
    ``>= n_train``): one batch ``arange(n_train)`` per epoch. Batch ``k`` of epoch ``e`` is
    element ``e * ceil(n_train / batch_size) + k``. ``recipe.max_steps`` truncates the list.
    """
    n_train = int(n_train)
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    bs = recipe.batch_size
    cap = recipe.max_steps
    if bs is None or bs >= n_train:
        return [torch.arange(n_train) for _ in range(min(recipe.epochs, cap or recipe.epochs))]
    g = torch.Generator().manual_seed(int(recipe.seed))
    out: list[Tensor] = []
    for _ in range(recipe.epochs):
        perm = torch.randperm(n_train, generator=g)
        out.extend(perm.split(bs))
        if cap is not None and len(out) >= cap:
            return out[:cap]
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
    """Mean cross-entropy (the data term of the objective).

    Classifiers: ``outputs [B, K]``, ``targets [B]``. Sequence models: ``outputs [B, T, V]``,
    ``targets [B, T]``: the mean over all tokens whose target is not ``-100`` (the
    ``ignore_index`` of :func:`mini_unlearn.gpt.lm_loss`).
    """
    if outputs.dim() == 3:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1),
                               ignore_index=-100)
    return F.cross_entropy(outputs, targets)


#: Rows per forward pass when :func:`objective` evaluates a large data set.
EVAL_CHUNK = 4096


def _mean_loss(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Mean loss over ``(X, y)`` without gradient, in chunks of :data:`EVAL_CHUNK` rows (each
    weighted by its rows, or its counted tokens for sequences). Float64 accumulator."""
    n = int(X.shape[0])
    chunk = EVAL_CHUNK if X.dim() != 2 or X.dtype.is_floating_point else max(1, EVAL_CHUNK // 16)
    if n <= chunk:
        return loss_fn(model(X), y).double()
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    count = 0
    for i in range(0, n, chunk):
        xb, yb = X[i:i + chunk], y[i:i + chunk]
        out = model(xb)
        w = int((yb != -100).sum()) if out.dim() == 3 else int(xb.shape[0])
        if w:
            total += loss_fn(out, yb).double() * w
            count += w
    return total / max(count, 1)


def _sq_norm(params: list[Tensor]) -> Tensor:
    return sum((p * p).sum() for p in params)  # type: ignore[return-value]


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def objective(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float) -> float:
    """``F(w) = mean CE(model(X), y) + (weight_decay/2) ||w||^2`` over all parameters (a float)."""
    with torch.no_grad():
        X = _as_input(model, X)
        loss = _mean_loss(model, X, y) + 0.5 * weight_decay * _sq_norm(list(model.parameters()))
    return float(loss)


def _as_input(model: nn.Module, X: Tensor) -> Tensor:
    """Features cast to the model's dtype; integer token ids (sequence models) left as they are."""
    return X if not X.dtype.is_floating_point and X.dim() == 2 and _is_sequence_model(model) \
        else X.to(_model_dtype(model))


def _is_sequence_model(model: nn.Module) -> bool:
    return getattr(model, "takes_tokens", False)


def objective_and_grad(model: nn.Module, X: Tensor, y: Tensor, weight_decay: float
                       ) -> tuple[float, Tensor]:
    """``F(w)`` and its gradient flattened over all parameters (in ``model.parameters()`` order).

    Leaves the parameters' ``.grad`` untouched.
    """
    params = [p for p in model.parameters()]
    X = _as_input(model, X)
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


def make_optimizer(params: list[Tensor], recipe: Recipe) -> torch.optim.Optimizer:
    """The torch optimizer of a minibatch ``recipe`` (its lr is set per step by :func:`train`).

    ``"sgd"``: ``SGD(momentum=0, weight_decay=wd)``; ``"momentum"``: ``SGD(momentum,
    weight_decay=wd)`` (coupled: ``wd * w`` joins the gradient before the momentum buffer);
    ``"adamw"``: ``AdamW(betas, eps, weight_decay=wd)`` (decoupled).
    """
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                                 weight_decay=recipe.weight_decay)
    momentum = recipe.momentum if recipe.optimizer == "momentum" else 0.0
    # SGD's weight_decay adds wd * w to the gradient: the gradient of (wd/2)||w||^2.
    return torch.optim.SGD(params, lr=recipe.lr, momentum=momentum,
                           weight_decay=recipe.weight_decay)


def _train_sgd(model: nn.Module, X: Tensor, y: Tensor, recipe: Recipe, indices: Tensor | None,
               step_callback: Callable[..., None] | None, progress: bool,
               optimizer_callback: Callable[[torch.optim.Optimizer], None] | None) -> dict:
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
    opt = make_optimizer(params, recipe)
    if optimizer_callback is not None:
        optimizer_callback(opt)
    it = steps
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(steps, desc=recipe.optimizer, unit="step")
    last = float("nan")
    model.train()
    for t, b in it:
        # The rate of the original step t: retraining keeps the schedule of the full run.
        lr = lr_at_step(recipe, t, spe)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(X[b]), y[b])
        loss.backward()
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        if step_callback is not None:
            step_callback(lr, indices=b)
        opt.step()
        last = float(loss.detach())
        if not math.isfinite(last):
            from .errors import NonFiniteError
            raise NonFiniteError(f"{recipe.optimizer} loss became non-finite at step {t} (lr {lr}); "
                                 f"lower the lr")
        if progress and t % 20 == 0:
            it.set_postfix(loss=f"{last:.4g}", lr=f"{lr:.3g}")  # type: ignore[union-attr]
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
        torch.optim.AdamW([p], lr=0.0).step()
        _OPTIM_WARM = True


def train(model: nn.Module, X: Tensor, y: Tensor, recipe: Recipe, *, indices: Tensor | None = None,
          step_callback: Callable[..., None] | None = None, progress: bool = False,
          optimizer_callback: Callable[[torch.optim.Optimizer], None] | None = None,
          final_objective: bool = True) -> dict:
    """Train ``model`` in place on ``(X, y)`` with ``recipe``; return stats.

    Args:
        model: any module mapping ``X`` to logits; float32 or float64 (``X`` is cast to its dtype;
            integer token ids of a sequence model stay int64).
        X, y: the full training set (``y`` int64 class labels, or ``[N, T]`` next-token targets
            with ``-100`` ignored for a sequence model).
        recipe: see :class:`Recipe`.
        indices: train on these rows only (retraining on the retained set). For a minibatch
            recipe the batch sequence is that of the full training set with the other rows
            removed and each step keeps the learning rate of its original step, so retraining
            replays the original run minus the forget samples (same optimizer, same schedule).
        step_callback: minibatch recipes only; ``step_callback(lr, indices=batch)`` after
            ``loss.backward()`` (and gradient clipping, if any) and before ``opt.step()`` on every
            step (``.grad`` then holds the minibatch gradient of the mean loss, without weight
            decay; ``lr`` is that step's scheduled rate; ``batch`` the int64 tensor of the
            minibatch's rows in the numbering of the full ``X``, also when retraining on
            ``indices``). ``Recorder.step`` fits as is (``history="all"`` needs the batch). Not
            called by L-BFGS (a converged run needs only its end point).
        progress: show a tqdm bar.
        optimizer_callback: minibatch recipes only; called once with the torch optimizer right
            after it is created (before the first step), e.g. to register optimizer step hooks.
        final_objective: evaluate ``final_loss`` (one more pass over the training rows); turn
            off for large corpora where that pass costs minutes.

    The model is in training mode while it trains (BatchNorm uses batch statistics and updates
    its running averages) and is left in **eval mode**, so later evaluations and gradients are
    a fixed function of the parameters.

    Returns:
        ``{"seconds", "steps", "final_loss", ...}``: ``final_loss`` is the regularised objective
        ``F`` on the training rows at the end (eval mode). L-BFGS adds ``grad_norm``
        (``||grad F||``), ``grad_norm_rel`` (÷ its initial value), ``converged`` (reached
        ``tol``) and ``polished_float64``. Float32 L-BFGS stalls near 1e-5 relative on MNIST;
        with ``recipe.polish_float64`` (default) it then finishes on a float64 copy and rounds
        back (float32 rounding of the optimum leaves ~1e-7 relative). Minibatch recipes add
        ``last_batch_loss``. ``seconds`` covers the optimisation only (not the final ``F``).
    """
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    X = _as_input(model, X)
    y = y.to(torch.long)
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() == 0:
            raise ValueError("indices is empty: nothing to train on")
        if int(indices.min()) < 0 or int(indices.max()) >= X.shape[0]:
            raise ValueError(f"indices out of range [0, {X.shape[0]})")
    if recipe.name == "lbfgs" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                      for m in model.modules()):
        raise ValueError("the lbfgs recipe needs a model without BatchNorm; use a minibatch recipe")
    _warm_up_optim()
    t0 = time.perf_counter()
    if recipe.name == "lbfgs":
        Xs, ys = (X, y) if indices is None else (X[indices], y[indices])
        stats = _train_lbfgs(model, Xs, ys, recipe, progress)
    else:
        try:
            stats = _train_sgd(model, X, y, recipe, indices, step_callback, progress,
                               optimizer_callback)
        finally:
            model.eval()
    stats["seconds"] = time.perf_counter() - t0
    if recipe.name == "sgd" and final_objective:
        Xs, ys = (X, y) if indices is None else (X[indices], y[indices])
        stats["final_loss"] = objective(model, Xs, ys, recipe.weight_decay)
    return stats
