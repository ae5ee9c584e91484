"""Random labels (RL) and SalUn: random-label unlearning, optionally restricted to salient weights.

SalUn (Fan, Liu, Zhang, Wong, Wei, Liu: "SalUn: Empowering Machine Unlearning via
Gradient-based Weight Saliency in Both Image Classification and Generation", ICLR 2024;
reference code OPTML-Group/Unlearn-Saliency, ``Classification/``):

1. **Saliency mask.** Accumulate the gradient of the cross-entropy on the forget set (one pass,
   the model as given); a weight is *salient* when ``|g|`` is in the top ``threshold`` fraction
   of all weights (one global threshold across layers; their ``mask/with_0.5.pt`` is 50%).
2. **Random-label training on the salient weights.** Each forget sample gets a label drawn
   uniformly from the classes (fixed for the run); the model is trained with cross-entropy on
   the forget set (random labels) together with the retain set (true labels), shuffled as one
   data set; after every backward pass the gradients of non-salient weights are zeroed.

``rl`` is step 2 without the mask (the RL baseline of the same paper; Golatkar et al. 2020).

Settings, their published defaults for classification (not tuned here, and never on the
evaluation data): SGD with momentum 0.9 and weight decay 5e-4, batch 256, 10 epochs at learning
rate 0.013 -- the value of their README's CIFAR-10 / ResNet-18 example (10% forgetting). The
paper tunes the learning rate per setting; on other data and models this default is a starting
point, not a tuned value (override with ``lr=``). Both run on a private copy (``unlearn()``).
"""
from __future__ import annotations

from ..errors import UnsupportedTrainingError

import torch
from torch import nn

from .. import _batches
from . import _train_utils as U

LR = 0.013
EPOCHS = 10
BATCH_SIZE = 256
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
THRESHOLD = 0.5


def saliency_mask(model: nn.Module, forget, loss_fn, *, threshold: float = THRESHOLD,
                  batch_size: int = BATCH_SIZE, device=None) -> list[torch.Tensor]:
    """SalUn's weight-saliency mask: 1 where ``|∇ L_forget|`` is in the top ``threshold``
    fraction over all trainable weights, else 0 (one bool tensor per trainable parameter).

    The gradient is that of the mean cross-entropy over the whole forget set (accumulated in
    batches of ``batch_size``, weighted by their sizes, so the mask does not depend on the
    batching; their ``generate_mask.py`` sums batch means, the same up to the last batch's
    weight, and the top-k cut is scale-free). The model's train/eval flag is restored and
    ``.grad`` is not touched.
    """
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"saliency threshold must be in (0, 1], got {threshold}")
    params = U.params(model)
    acc = [torch.zeros_like(p) for p in params]
    n = U.check_data(forget, "forget", "salun")
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for xb, yb in _batches.batches(forget, batch_size, device):
                w = xb.shape[0] / n
                grads = torch.autograd.grad(loss_fn(model(xb), yb) * w, params)
                for a, g in zip(acc, grads):
                    a.add_(g)
    finally:
        model.train(was)
    flat = torch.cat([a.abs().reshape(-1) for a in acc])
    k = max(1, int(round(threshold * flat.numel())))
    cut = torch.topk(flat, k, sorted=True).values[-1]
    return [a.abs() >= cut for a in acc]


def _random_label_training(name, model, forget, retain, loss_fn, device, progress, *, mask,
                           num_classes, epochs, lr, momentum, weight_decay, train_batch_size, seed):
    U.require(retain, "retain", name, "the retained data as (X, y) tensors")
    if not (isinstance(forget, (tuple, list)) and torch.is_tensor(forget[0])
            and isinstance(retain, (tuple, list)) and torch.is_tensor(retain[0])):
        raise ValueError(f"method={name!r} needs forget and retain as (X, y) tensors")
    epochs, lr, bs = int(epochs), float(lr), int(train_batch_size)
    if epochs < 1 or not lr > 0 or bs < 1 or weight_decay < 0:
        raise ValueError(f"method={name!r}: need epochs >= 1, lr > 0, batch >= 1, weight_decay >= 0")
    gen = torch.Generator().manual_seed(int(seed))
    Xf, yf = forget
    Xr, yr = retain
    if yf.dim() != 1:
        raise UnsupportedTrainingError(
            f"method={name!r} relabels each forgotten sample with one random class; these targets have "
            f"shape {tuple(yf.shape)} (e.g. per-token targets of a language model), which it does not "
            "define. Use method='mini', 'finetune', 'neggrad', 'ga' or 'scrub'")
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(Xf[:1].to(device)).shape[1])
    y_rand = torch.randint(0, int(num_classes), (Xf.shape[0],), generator=gen).to(yf.device, yf.dtype)
    data = (torch.cat([Xf.to(device), Xr.to(device)]), torch.cat([y_rand.to(device), yr.to(device)]))
    loader = U.Shuffled(data, bs, device, gen)
    params = U.params(model)
    opt = torch.optim.SGD(params, lr=lr, momentum=float(momentum), weight_decay=float(weight_decay))

    def loss_of(item):
        xb, yb = item
        return loss_fn(model(xb), yb), xb.shape[0]

    # Non-salient gradients are zeroed as they are computed (before weight decay and momentum,
    # as SalUn multiplies ``param.grad`` by the mask between backward and step).
    hooks = []
    if mask is not None:
        hooks = [p.register_hook(lambda g, m=m: g * m.to(g.dtype)) for p, m in zip(params, mask)]
    try:
        evals = U.train_epochs(model, opt, lambda: loader, loss_of, epochs, len(loader),
                               desc=f"mini_unlearn: {name} steps", progress=progress, what=name)
    finally:
        for h in hooks:
            h.remove()
    return dict(mode=None, passes=epochs, grad_evals=evals, certificate=None, verified=False,
                epochs=epochs, lr=lr, momentum=float(momentum), weight_decay=float(weight_decay),
                train_batch_size=bs, retained=int(Xr.shape[0]))


def rl(model, log, forget, loss_fn, *, mode, retain, r, max_passes, tol, batch_size, device,
       progress, num_classes: int | None = None, epochs: int = EPOCHS, lr: float = LR,
       momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY,
       train_batch_size: int = BATCH_SIZE, seed: int = 0, recipe=None) -> dict:
    """RL: train on forget samples with uniformly random labels together with the retain set.

    Kwargs (SalUn's classification defaults): ``epochs`` 10, ``lr`` 0.013, ``momentum`` 0.9,
    ``weight_decay`` 5e-4, ``train_batch_size`` 256, ``seed`` (labels and batch order),
    ``num_classes`` (default: the model's output width). ``retain=`` is required.
    """
    return _random_label_training("rl", model, forget, retain, loss_fn, device, progress, mask=None,
                                  num_classes=num_classes, epochs=epochs, lr=lr, momentum=momentum,
                                  weight_decay=weight_decay, train_batch_size=train_batch_size,
                                  seed=seed)


def salun(model, log, forget, loss_fn, *, mode, retain, r, max_passes, tol, batch_size, device,
          progress, threshold: float = THRESHOLD, num_classes: int | None = None,
          epochs: int = EPOCHS, lr: float = LR, momentum: float = MOMENTUM,
          weight_decay: float = WEIGHT_DECAY, train_batch_size: int = BATCH_SIZE, seed: int = 0,
          recipe=None) -> dict:
    """SalUn: RL restricted to the weights whose forget-gradient saliency is in the top
    ``threshold`` (50%). Other kwargs as :func:`rl`; ``retain=`` is required."""
    mask = saliency_mask(model, forget, loss_fn, threshold=threshold, batch_size=batch_size,
                         device=device)
    out = _random_label_training("salun", model, forget, retain, loss_fn, device, progress,
                                 mask=mask, num_classes=num_classes, epochs=epochs, lr=lr,
                                 momentum=momentum, weight_decay=weight_decay,
                                 train_batch_size=train_batch_size, seed=seed)
    n_mask = sum(int(m.sum()) for m in mask)
    n_all = sum(m.numel() for m in mask)
    out.update(threshold=float(threshold), salient_fraction=n_mask / n_all)
    out["passes"] += 1  # the saliency pass over the forget set
    out["grad_evals"] += int(r)
    return out
