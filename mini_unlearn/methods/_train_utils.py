"""Shared pieces of the gradient-based baselines (finetune, NegGrad+, ∇τ): shuffled minibatches
of data given as (X, y) tensors / a Dataset / a DataLoader, pairing two loaders, the optimizer
step loop and the defaults taken from a training recipe."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import _batches
from ..errors import NonFiniteError

DEFAULT_BATCH_SIZE = 64


def require(value, name: str, method: str, what: str):
    """``value`` or a ValueError naming the missing argument."""
    if value is None:
        raise ValueError(f"method={method!r} needs {name}=: {what}")
    return value


def check_data(data, name: str, method: str) -> int:
    """Number of samples of ``data``; a ValueError when it is not data or empty."""
    try:
        n = _batches.count(data)
    except TypeError as exc:
        raise ValueError(f"method={method!r}: {name}= must be (X, y) tensors, a Dataset or a "
                         f"DataLoader, got {type(data).__name__}") from exc
    if n == 0:
        raise ValueError(f"method={method!r}: {name}= is empty")
    return n


def train_batch_size(kwargs_value: int | None, recipe) -> int:
    """The minibatch size of an unlearning run: the explicit value, else the recipe's, else 64.

    (``unlearn(batch_size=...)`` is the batch of gradient-free *evaluation* passes, 512 by
    default; training-type baselines take ``train_batch_size=`` instead.)
    """
    if kwargs_value is not None:
        bs = int(kwargs_value)
    elif recipe is not None and getattr(recipe, "batch_size", None):
        bs = int(recipe.batch_size)
    else:
        bs = DEFAULT_BATCH_SIZE
    if bs < 1:
        raise ValueError(f"train_batch_size must be >= 1, got {bs}")
    return bs


class Shuffled:
    """Minibatches of ``data``, in a fresh seeded random order on every pass, moved to ``device``.

    (X, y) tensors and Datasets are cut into batches of ``batch_size`` (the last one may be
    smaller); a DataLoader is used as given (its own batch size, order and augmentation).
    ``len()`` is the number of batches of one pass.
    """

    def __init__(self, data, batch_size: int, device, generator: torch.Generator):
        self.data, self.bs, self.device, self.gen = data, int(batch_size), device, generator
        self.n = _batches.count(data)
        if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
            self.kind = "tensors"
        elif isinstance(data, DataLoader):
            self.kind = "loader"
        elif isinstance(data, Dataset):
            self.kind = "dataset"
        else:
            raise TypeError(f"data must be (X, y) tensors, a Dataset or a DataLoader, got "
                            f"{type(data).__name__}")

    def __len__(self) -> int:
        if self.kind == "loader":
            return len(self.data)
        return max(1, math.ceil(self.n / self.bs))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kind == "loader":
            yield from _batches.batches(self.data, device=self.device)
            return
        perm = torch.randperm(self.n, generator=self.gen)
        if self.kind == "tensors":
            X, y = self.data
            for b in perm.split(self.bs):
                b = b.to(X.device)
                yield _batches._to(X[b], self.device), _batches._to(y[b], self.device)
            return
        loader = DataLoader(torch.utils.data.Subset(self.data, perm.tolist()), batch_size=self.bs,
                            shuffle=False)
        yield from _batches.batches(loader, device=self.device)


def cycle(loader: Iterable) -> Iterator:
    """``loader``'s batches pass after pass, for ever (each pass reshuffled)."""
    while True:
        empty = True
        for item in loader:
            empty = False
            yield item
        if empty:
            raise ValueError("cannot cycle over an empty data set")


def paired(primary: Iterable, secondary_cycle: Iterator) -> Iterator[tuple]:
    """One pass over ``primary``, each batch paired with the next batch of ``secondary_cycle``."""
    for a in primary:
        yield a, next(secondary_cycle)


def step_loop(model: nn.Module, opt: torch.optim.Optimizer, items: Iterable,
              loss_of: Callable[[object], tuple[torch.Tensor, int]], *,
              scheduler=None, what: str = "unlearning") -> int:
    """For each item: ``loss, samples = loss_of(item)``, backward, optimizer (and scheduler) step.

    Returns the number of sample gradients computed (sum of ``samples``). Raises
    :class:`NonFiniteError` if a loss is NaN/Inf (the caller's model is a private copy).
    """
    evals = 0
    for t, item in enumerate(items):
        opt.zero_grad(set_to_none=True)
        loss, samples = loss_of(item)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"{what}: the loss became non-finite at step {t}; lower the lr")
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        evals += int(samples)
    opt.zero_grad(set_to_none=True)
    return evals


def train_epochs(model: nn.Module, opt: torch.optim.Optimizer, epoch_items: Callable[[], Iterable],
                 loss_of: Callable[[object], tuple[torch.Tensor, int]], epochs: int, steps_per_epoch: int, *,
                 desc: str, progress: bool, what: str, train: bool = True) -> int:
    """``epochs`` passes of :func:`step_loop` over ``epoch_items()`` (a fresh iterable per epoch)
    with the model in train mode (``train``), a tqdm bar of ``steps_per_epoch`` per epoch, and the
    model's mode restored afterwards, also on error. Returns the sample gradients computed."""
    from tqdm.auto import tqdm

    was = model.training
    model.train(train)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)

    def counted(item):
        bar.update(1)
        return loss_of(item)

    evals = 0
    try:
        for _ in range(epochs):
            evals += step_loop(model, opt, epoch_items(), counted, what=what)
    finally:
        bar.close()
        model.train(was)
    return evals


def mean_loss(model: nn.Module, data, loss_fn, batch_size: int, device) -> float:
    """Sample-weighted mean of ``loss_fn`` over ``data``, without gradient, in eval mode (the
    model's train/eval flag is restored)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for xb, yb in _batches.batches(data, batch_size, device):
                total += float(loss_fn(model(xb), yb)) * xb.shape[0]
                n += int(xb.shape[0])
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("cannot compute a mean loss over an empty data set")
    return total / n


def params(model: nn.Module) -> list[torch.Tensor]:
    ps = [p for p in model.parameters() if p.requires_grad]
    if not ps:
        raise ValueError("the model has no trainable parameters")
    return ps


def recipe_epochs_default(recipe, fraction: float, floor: int) -> int:
    """``max(floor, ceil(fraction * recipe.epochs))`` for an SGD recipe, else ``floor``."""
    if recipe is not None and getattr(recipe, "name", None) == "sgd":
        return max(int(floor), math.ceil(fraction * int(recipe.epochs)))
    return int(floor)


def recipe_final_lr(recipe, fallback: float) -> float:
    """The learning rate of an SGD recipe's last epoch, else ``fallback``."""
    if recipe is not None and getattr(recipe, "name", None) == "sgd":
        from ..models import lr_at_epoch
        return lr_at_epoch(recipe, int(recipe.epochs) - 1)
    return float(fallback)
