"""torch.optim.Adam and AdamW. ``m ← β₁ m + (1 − β₁) g``; the step is
``lr/(1 − β₁ᵗ) · m · d`` with ``d = 1/(√(v/(1 − β₂ᵗ)) + ε)``; Adam's weight decay is coupled
(``g ← g + wd·w``), AdamW's decoupled (``w ← w (1 − lr·wd)``). The bias correction folds into
``eta``; ``d`` is read after each step and averaged over a segment (its own dependence on the
error is second order and ignored). AMSGrad and maximize are refused."""
from __future__ import annotations

import torch

from . import Adapter, StepRule, _refuse, register
from ..errors import UnsupportedTrainingError


class AdamAdapter(Adapter):
    classes = (torch.optim.Adam, torch.optim.AdamW)
    preconditioned = True
    name = "Adam"

    def check(self, opt):
        for g in opt.param_groups:
            _refuse(opt, g, "amsgrad", "its running max of v is not recorded")
            _refuse(opt, g, "maximize", "it ascends the loss")
            _refuse(opt, g, "differentiable", "differentiable optimizer steps are not recorded")
            if g.get("decoupled_weight_decay") not in (None, False, True):
                raise UnsupportedTrainingError(f"{type(opt).__name__}: unknown decoupled_weight_decay")
            if torch.is_tensor(g["lr"]) or any(torch.is_tensor(b) for b in g["betas"]):
                raise UnsupportedTrainingError(f"{type(opt).__name__}: tensor lr/betas are not supported; "
                                               "pass Python floats")

    @staticmethod
    def _decoupled(opt, group) -> bool:
        return isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))

    def rule(self, opt, group, step):
        lr = float(group["lr"])
        b1 = float(group["betas"][0])
        bc1 = 1.0 - b1 ** step
        wd = float(group.get("weight_decay", 0.0))
        dec = self._decoupled(opt, group)
        # w ← w(1 − lr·wd) = (1 − eta·lam_dec) with eta = lr/bc1  =>  lam_dec = wd·bc1
        return StepRule(eta=lr / bc1, mu=b1, c=1.0 - b1, lam=0.0 if dec else wd,
                        lam_dec=wd * bc1 if dec else 0.0, nesterov=False)

    def precond(self, opt, group, p, step):
        v = opt.state[p]["exp_avg_sq"]
        bc2 = 1.0 - float(group["betas"][1]) ** step
        return 1.0 / ((v.float() / bc2).sqrt() + float(group["eps"]))


register(AdamAdapter())
