"""Optimizer adapters: what the linearised training map of each supported optimizer looks like.

Every supported optimizer's step, linearised around the original run, moves the error
``e = w_retrain − w`` and the error ``u`` of its first-moment buffer by one template per
coordinate (``docs/math.md``, "Optimizers")::

    u ← μ u + c (ν' e + δ)                 (Nesterov: the step also adds μ u)
    e ← (1 − η λ_dec) e − η d u

An adapter reads, at every optimizer step and for every parameter group, the numbers of that
template: the effective step ``eta`` (Adam's first-moment bias correction folded in), ``mu``,
``c``, the coupled decay ``lam`` (added to the gradient, so ``ν' = ν + lam``), the decoupled
decay ``lam_dec`` (per unit of ``eta``), ``nesterov``, and whether a diagonal preconditioner
``d`` applies (Adam's ``1/(√v̂ + ε)``, read after the step). A new optimizer is one adapter
module registered in :data:`ADAPTERS`; anything unregistered raises
:class:`~mini_unlearn.errors.UnsupportedTrainingError`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..errors import UnsupportedTrainingError


@dataclass(frozen=True)
class StepRule:
    """One parameter group's linearised update at one step (see the module docstring)."""

    eta: float
    mu: float = 0.0
    c: float = 1.0
    lam: float = 0.0
    lam_dec: float = 0.0
    nesterov: bool = False

    def key(self) -> tuple:
        return (self.eta, self.mu, self.c, self.lam, self.lam_dec, self.nesterov)


class Adapter(abc.ABC):
    """Base class: reads an optimizer's param groups into :class:`StepRule` s."""

    #: the exact optimizer classes this adapter covers (subclasses are refused: they may
    #: change the update)
    classes: tuple[type, ...] = ()
    #: True when the update has a diagonal preconditioner d (read after each step)
    preconditioned: bool = False
    name: str = ""

    def check(self, opt: torch.optim.Optimizer) -> None:
        """Raise UnsupportedTrainingError for settings the template cannot express."""

    @abc.abstractmethod
    def rule(self, opt: torch.optim.Optimizer, group: dict, step: int) -> StepRule:
        """The rule of ``group`` at its ``step``-th update (1-based), read before the step."""

    def precond(self, opt: torch.optim.Optimizer, group: dict, p: torch.Tensor, step: int) -> torch.Tensor:
        """d for parameter ``p`` after its ``step``-th update. Only preconditioned adapters are
        asked (and :func:`register` checks that they define it)."""
        raise TypeError(f"{type(self).__name__} is not preconditioned")


ADAPTERS: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    """Add an adapter instance (a preconditioned one must define ``precond``)."""
    if adapter.preconditioned and type(adapter).precond is Adapter.precond:
        raise TypeError(f"{type(adapter).__name__} is preconditioned but defines no precond")
    ADAPTERS.append(adapter)
    return adapter


def adapter_for(opt) -> Adapter:
    """The adapter of ``opt``'s exact class, after checking its settings."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise UnsupportedTrainingError(f"Recorder.attach needs a torch.optim.Optimizer, got {type(opt).__name__}")
    for a in ADAPTERS:
        if type(opt) in a.classes:
            a.check(opt)
            return a
    names = ", ".join(c.__name__ for a in ADAPTERS for c in a.classes)
    raise UnsupportedTrainingError(
        f"optimizer {type(opt).__name__} is not supported (supported: {names}). Its update has no "
        "recorded linearisation, so unlearning would be a silent approximation; train with a "
        "supported optimizer, or record by hand with rec.step(lr) if the update is plain SGD")


def _refuse(opt, group: dict, key: str, what: str) -> None:
    """Refuse a truthy boolean setting ``key`` of a param group."""
    if group.get(key):
        raise UnsupportedTrainingError(f"{type(opt).__name__}({key}={group.get(key)!r}) is not supported: {what}")


from . import adam, sgd  # noqa: E402,F401  (registers the adapters)
