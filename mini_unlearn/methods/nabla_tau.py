"""∇τ: gradient-based, task-agnostic unlearning (Trippa et al., arXiv 2403.14339; docs/math.md).

Per step, a forget batch B_f and a retain batch B_r:

    loss = α · ReLU(L̄_val − L̄_forget(B_f))² + (1 − α) · L̄_retain(B_r)

- L̄_val: mean loss on held-out validation data (``val=``), without gradient; computed at the
  start and recomputed every 5 epochs (before epochs 0, 5, 10, ...). The forget term raises the
  forget loss up to the validation loss and no further (ReLU), so forget samples end up looking
  like unseen data rather than being pushed to arbitrarily high loss.
- α₀ = (5/3)·r/n, decreased linearly by α₀/E after each epoch, reaching 0 after the last one:
  epoch e (0-based) uses α₀·(1 − e/E) (:func:`alpha_schedule`). For r/n > 0.6 the formula
  gives α₀ > 1 (a negative retain weight); α is clamped to 1 there, the only deviation.
- E = ⌊6·N_r / (2·N_f)⌋ epochs, capped at 80, at least 1 (:func:`num_epochs`); N_r, N_f are
  the numbers of retain/forget batches of one pass.
- **Pairing**: an epoch is one pass over the forget batches (reshuffled every epoch); each is
  paired with the next batch of the retain loader, which is cycled (reshuffled on every wrap)
  across epochs. So E epochs touch E·N_f ≈ 3·N_r retain batches: about three retain passes in
  total, whatever the forget ratio -- the budget the epoch rule is built for.
- AdamW, lr 1e-3 (torch's default decoupled weight decay 0.01), LinearLR from 1.0× to 0.1×
  over the E·N_f steps. Model in train mode throughout (L̄_val is evaluated in eval mode, as a
  measurement, with the train flag restored). The forget loss is on the forget inputs as given:
  pass them without augmentation (a retain DataLoader may augment).
"""
from __future__ import annotations


import torch
from tqdm.auto import tqdm

from . import _train_utils as U

NAME = "nabla_tau"
MAX_EPOCHS = 80
VAL_EVERY = 5
LR = 1e-3


def num_epochs(n_retain_batches: int, n_forget_batches: int) -> int:
    """E = ⌊6·N_r / (2·N_f)⌋, capped at 80 and at least 1."""
    n_r, n_f = int(n_retain_batches), int(n_forget_batches)
    if n_r < 1 or n_f < 1:
        raise ValueError(f"need at least one retain and one forget batch, got N_r={n_r}, N_f={n_f}")
    return max(1, min(MAX_EPOCHS, (6 * n_r) // (2 * n_f)))


def alpha_schedule(r: int, n: int, epochs: int) -> list[float]:
    """α of each epoch: α₀·(1 − e/E) for e = 0..E−1, α₀ = (5/3)·r/n (clamped to ≤ 1).

    α drops by α₀/E after every epoch, so it would be 0 after the last one.
    """
    r, n, epochs = int(r), int(n), int(epochs)
    if not 0 < r < n:
        raise ValueError(f"need 0 < r < n, got r={r}, n={n}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    a0 = min(1.0, (5.0 / 3.0) * r / n)
    return [a0 * (1.0 - e / epochs) for e in range(epochs)]


def run(model, log, forget, loss_fn, *, mode, retain, r, max_passes, tol, batch_size, device,
        progress, val=None, recipe=None, train_batch_size=None, lr: float = LR,
        weight_decay: float = 0.01, seed: int = 0) -> dict:
    """∇τ on ``model`` (a private copy, modified in place).

    Kwargs: ``val`` (held-out validation data, required), ``recipe`` (for the default batch
    size), ``train_batch_size`` (default: the recipe's, else 64), ``lr`` (1e-3),
    ``weight_decay`` (AdamW's, 0.01), ``seed`` (batch order). ``retain=`` is required.
    """
    U.require(retain, "retain", NAME, "the retained data, (X, y) tensors, a Dataset or a DataLoader")
    U.require(val, "val", NAME, "held-out validation data (not training data), (X, y) tensors, "
              "a Dataset or a DataLoader")
    n_ret = U.check_data(retain, "retain", NAME)
    n_val = U.check_data(val, "val", NAME)
    n = int(log.meta["n_train"])
    bs = U.train_batch_size(train_batch_size, recipe)
    gen = torch.Generator().manual_seed(int(seed))
    f_loader = U.Shuffled(forget, bs, device, gen)
    r_loader = U.Shuffled(retain, bs, device, gen)
    n_f, n_r = len(f_loader), len(r_loader)
    E = num_epochs(n_r, n_f)
    alphas = alpha_schedule(r, n, E)
    total = E * n_f
    opt = torch.optim.AdamW(U.params(model), lr=float(lr), weight_decay=float(weight_decay))
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=total)
    retain_cycle = U.cycle(r_loader)
    was = model.training
    model.train()
    evals, val_losses = 0, []
    bar = tqdm(total=total, desc="mini_unlearn: ∇τ steps", disable=not progress, leave=False)
    try:
        for e, alpha in enumerate(alphas):
            if e % VAL_EVERY == 0:
                val_losses.append(U.mean_loss(model, val, loss_fn, batch_size, device))
                model.train()
            l_val = val_losses[-1]

            def loss_of(item, alpha=alpha, l_val=l_val):
                (xf, yf), (xr, yr) = item
                l_f = loss_fn(model(xf), yf)
                l_r = loss_fn(model(xr), yr)
                bar.update(1)
                return (alpha * torch.relu(l_val - l_f) ** 2 + (1.0 - alpha) * l_r,
                        xf.shape[0] + xr.shape[0])

            evals += U.step_loop(model, opt, U.paired(f_loader, retain_cycle), loss_of,
                                 scheduler=sched, what="∇τ")
    finally:
        bar.close()
        model.train(was)
    return dict(mode=None, passes=E, grad_evals=evals, certificate=None, verified=False,
                epochs=E, steps=total, alpha0=alphas[0], forget_batches=n_f, retain_batches=n_r,
                retain_passes=total / n_r, train_batch_size=bs, val_losses=val_losses,
                val_evals=len(val_losses) * n_val,
                retained=n_ret)
