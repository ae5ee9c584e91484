"""SCRUB (Kurmanji, Triantafillou, Hayes, Triantafillou: "Towards Unbounded Machine Unlearning",
NeurIPS 2023; reference code meghdadk/SCRUB).

A student, initialised as the original model, is distilled from the frozen original (the
teacher) by alternating

- **max steps** (the first ``msteps`` epochs only): one pass over the forget set minimising
  ``−KL_T(teacher ‖ student)`` -- move away from the teacher on the forget samples;
- **min steps** (every epoch): one pass over the retain set minimising
  ``γ · CE(student, y) + α · KL_T(teacher ‖ student)`` -- stay close to it elsewhere;

with ``KL_T`` the temperature-``T`` distillation loss of Hinton et al. (``T² · KL`` of the
softened distributions, summed over classes, averaged over the batch).

Settings, the reference code's defaults for small-scale selective unlearning (not tuned here,
and never on the evaluation data): ``T = 4``, ``γ = 0.99``, ``α = 0.001``, ``msteps = 2``,
3 epochs, SGD lr 5e-4 with momentum 0.9 and weight decay 5e-4, learning rate ×0.1 at epochs
3, 5, 9 (inactive within 3 epochs), forget batch 32, retain batch 128. The authors tune the
learning rate and ``msteps`` per setting; these are their defaults (override with kwargs). Their
optional SWA averaging of the student is left out. Runs on a private copy (``unlearn()``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import _train_utils as U

NAME = "scrub"
LR = 5e-4
EPOCHS = 3
MSTEPS = 2
TEMPERATURE = 4.0
GAMMA = 0.99
ALPHA = 0.001
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_DECAY_EPOCHS = (3, 5, 9)
LR_DECAY_RATE = 0.1
FORGET_BATCH = 32
RETAIN_BATCH = 128


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` summed over classes, mean over the batch."""
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return kl.mean() * (T * T)


def run(model, log, forget, loss_fn, *, mode, retain, r, max_passes, tol, batch_size, device,
        progress, epochs: int = EPOCHS, msteps: int = MSTEPS, lr: float = LR,
        temperature: float = TEMPERATURE, gamma: float = GAMMA, alpha: float = ALPHA,
        momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY,
        forget_batch_size: int = FORGET_BATCH, retain_batch_size: int = RETAIN_BATCH,
        seed: int = 0, recipe=None) -> dict:
    """SCRUB on ``model`` (a private copy; the teacher is a frozen copy of it taken first).

    Kwargs: ``epochs`` (3), ``msteps`` (2), ``lr`` (5e-4), ``temperature`` (4), ``gamma``
    (0.99, CE weight), ``alpha`` (0.001, KL weight), ``momentum`` (0.9), ``weight_decay``
    (5e-4), ``forget_batch_size`` (32), ``retain_batch_size`` (128), ``seed`` (batch order).
    ``retain=`` is required.
    """
    U.require(retain, "retain", NAME, "the retained data, (X, y) tensors, a Dataset or a DataLoader")
    n_ret = U.check_data(retain, "retain", NAME)
    epochs, msteps, lr, T = int(epochs), int(msteps), float(lr), float(temperature)
    if epochs < 1 or msteps < 0 or not lr > 0 or not T > 0:
        raise ValueError(f"method='scrub': need epochs >= 1, msteps >= 0, lr > 0, temperature > 0; "
                         f"got {epochs}, {msteps}, {lr}, {T}")
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    f_loader = U.Shuffled(forget, int(forget_batch_size), device, gen)
    r_loader = U.Shuffled(retain, int(retain_batch_size), device, gen)
    opt = torch.optim.SGD(U.params(model), lr=lr, momentum=float(momentum),
                          weight_decay=float(weight_decay))
    n_max = min(msteps, epochs)
    bar = tqdm(total=n_max * len(f_loader) + epochs * len(r_loader), desc="mini_unlearn: SCRUB steps",
               disable=not progress, leave=False)

    def max_loss(item):
        xb, yb = item
        bar.update(1)
        with torch.no_grad():
            t = teacher(xb)
        return -distill_kl(model(xb), t, T), xb.shape[0]

    def min_loss(item):
        xb, yb = item
        bar.update(1)
        with torch.no_grad():
            t = teacher(xb)
        out = model(xb)
        return gamma * loss_fn(out, yb) + alpha * distill_kl(out, t, T), xb.shape[0]

    was = model.training
    model.train()
    evals = 0
    try:
        for epoch in range(1, epochs + 1):
            decays = sum(epoch > e for e in LR_DECAY_EPOCHS)
            for g in opt.param_groups:
                g["lr"] = lr * LR_DECAY_RATE ** decays
            if epoch <= msteps:
                evals += U.step_loop(model, opt, f_loader, max_loss, what="SCRUB max step")
            evals += U.step_loop(model, opt, r_loader, min_loss, what="SCRUB min step")
    finally:
        bar.close()
        model.train(was)
    return dict(mode=None, passes=epochs + n_max, grad_evals=evals, certificate=None,
                verified=False, epochs=epochs, msteps=n_max, lr=lr, temperature=T, gamma=gamma,
                alpha=alpha, retained=n_ret)
