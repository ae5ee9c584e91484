"""GA: gradient ascent on the forget set (the GA baseline of Thudi et al. 2022, as run by Jia et
al. 2023, "Model Sparsity Can Simplify Machine Unlearning", and SalUn, ICLR 2024).

Minimise ``−L_forget`` (SGD on the negated cross-entropy of forget batches), nothing else: no
retain term, so it degrades the model once the forget loss is high; the short budget is what
limits it. Settings, the published defaults of their shared code base (OPTML-Group
Unlearn-Sparse / Unlearn-Saliency, ``--unlearn GA --unlearn_lr 0.0001 --unlearn_epochs 5``):
5 epochs over the forget set, learning rate 1e-4, SGD with momentum 0.9, weight decay 5e-4,
batch 256. Those papers tune the learning rate per setting; this default is not tuned here (and
never on the evaluation data); override with ``lr=``. Runs on a private copy (``unlearn()``).
"""
from __future__ import annotations

import torch

from . import _train_utils as U

LR = 1e-4
EPOCHS = 5
BATCH_SIZE = 256
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def run(model, log, forget, loss_fn, *, mode, retain, r, max_passes, tol, batch_size, device,
        progress, epochs: int = EPOCHS, lr: float = LR, momentum: float = MOMENTUM,
        weight_decay: float = WEIGHT_DECAY, train_batch_size: int = BATCH_SIZE, seed: int = 0,
        recipe=None) -> dict:
    """Gradient ascent on the forget set. Kwargs: ``epochs`` (5), ``lr`` (1e-4), ``momentum``
    (0.9), ``weight_decay`` (5e-4), ``train_batch_size`` (256), ``seed`` (batch order)."""
    epochs, lr, bs = int(epochs), float(lr), int(train_batch_size)
    if epochs < 1 or not lr > 0 or bs < 1 or weight_decay < 0:
        raise ValueError("method='ga': need epochs >= 1, lr > 0, batch >= 1, weight_decay >= 0")
    loader = U.Shuffled(forget, bs, device, torch.Generator().manual_seed(int(seed)))
    opt = torch.optim.SGD(U.params(model), lr=lr, momentum=float(momentum),
                          weight_decay=float(weight_decay))

    def loss_of(item):
        xb, yb = item
        return -loss_fn(model(xb), yb), xb.shape[0]

    evals = U.train_epochs(model, opt, lambda: loader, loss_of, epochs, len(loader),
                           desc="mini_unlearn: GA steps", progress=progress, what="GA")
    return dict(mode=None, passes=epochs, grad_evals=evals, certificate=None, verified=False,
                epochs=epochs, lr=lr, momentum=float(momentum), weight_decay=float(weight_decay),
                train_batch_size=bs)
