"""torch.optim.SGD: momentum, dampening, Nesterov and coupled weight decay (PyTorch's convention:
``g ← g + wd·w``; ``buf ← μ buf + (1 − τ) g`` with ``buf = g`` at the first step; the step is
``η·buf``, or ``η·(g + μ buf)`` with Nesterov)."""
from __future__ import annotations

import torch

from . import Adapter, StepRule, _refuse, register


class SGDAdapter(Adapter):
    classes = (torch.optim.SGD,)
    name = "SGD"

    def check(self, opt):
        for g in opt.param_groups:
            _refuse(opt, g, "maximize", "it ascends the loss")
            _refuse(opt, g, "differentiable", "differentiable optimizer steps are not recorded")

    def rule(self, opt, group, step):
        mu = float(group.get("momentum", 0.0))
        # PyTorch's first momentum step sets buf = g (no dampening): c = 1 there.
        c = 1.0 if (mu == 0.0 or step == 1) else 1.0 - float(group.get("dampening", 0.0))
        return StepRule(eta=float(group["lr"]), mu=mu, c=c, lam=float(group.get("weight_decay", 0.0)),
                        lam_dec=0.0, nesterov=bool(group.get("nesterov", False)) and mu > 0)


register(SGDAdapter())
