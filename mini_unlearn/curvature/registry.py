"""Per-layer curvature rules (kronfluence-style wrappers) and the registry that maps a module
type to its rule. A new layer type is one new module: subclass :class:`LayerRule`, decorate it
with :func:`register`, and import it in ``__init__.py``.

A rule covers a layer's parameters in one of two ways:

* **Kronecker** (``kron``): the layer's weight (+ bias) is a [d_out, d_in (+1)] matrix whose
  per-sample gradient is Σ_t δ_t ã_tᵀ over the layer's positions t. The pass sums
  A = Σ_i (1/T) Σ_t ã ãᵀ (``a_rows``) and G = Σ_i Σ_t δ δᵀ (``g_rows``), so that A⊗G / n² is the
  mean curvature as the loss averaged it (K-FAC "expand" / KFC: weight sharing sums the
  per-position gradients; the 1/T sits in A).
* **Cheap diagonal** (``diag_params`` + ``per_sample``): per-sample gradients computed in closed
  form from the layer's input and its output gradient δ (one backward for the whole batch),
  squared and summed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedTrainingError
from .layout import KronBlock, Layout

_RULES: list["LayerRule"] = []


class LayerRule:
    """How one layer type contributes to the curvature. Subclasses set ``types``."""

    types: tuple[type[nn.Module], ...] = ()

    def kron(self, name: str, module: nn.Module, layout: Layout) -> KronBlock | None:
        """The Kronecker block covering this layer's weight, if the layout covers it."""
        return None

    def diag_params(self, name: str, module: nn.Module, layout: Layout, taken: set[str]) -> list[str]:
        """Names of this layer's covered parameters (not in ``taken``) with a cheap diagonal."""
        return []

    # ---- during a pass (inputs/outputs detached, float32) ----
    def a_rows(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Input rows [B·T, d_in] (no bias column) and T, the positions per sample. Kronecker
        rules override this or ``a_factor`` (checked by :func:`register`)."""
        raise TypeError(f"{type(self).__name__} has a Kronecker block but defines neither a_rows nor a_factor")

    def g_rows(self, module: nn.Module, dy: torch.Tensor) -> torch.Tensor:
        """Output-gradient rows [B·T, d_out], in the same order as ``a_rows``. Kronecker rules
        override this or ``g_factor`` (checked by :func:`register`)."""
        raise TypeError(f"{type(self).__name__} has a Kronecker block but defines neither g_rows nor g_factor")

    def a_factor(self, module: nn.Module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """Σ_i (1/T) Σ_t ã ãᵀ over the batch, [cols, cols], ã = (a, 1) with ``bias``. The default
        goes through ``a_rows``; layers override it to avoid materialising the rows."""
        rows, T = self.a_rows(module, x)
        a = rows.T @ rows
        if bias:  # [[RᵀR, Rᵀ1], [1ᵀR, N]] without concatenating a column of ones to the rows
            a = _with_bias(a, rows.sum(0), rows.shape[0])
        return a / T

    def g_factor(self, module: nn.Module, dy: torch.Tensor) -> torch.Tensor:
        """Σ_i Σ_t δ δᵀ over the batch, [d_out, d_out]."""
        d = self.g_rows(module, dy)
        return d.T @ d

    def prepare(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> object:
        """Whatever ``per_sample`` needs from the input ``x`` (and output ``y``), computed once
        per batch (not per output-side vector): e.g. the normalised input x̂."""
        return x

    def per_sample(self, module: nn.Module, prep: object, dy: torch.Tensor,
                   names: list[str], pnames: dict[str, str]) -> dict[str, torch.Tensor]:
        """Per-sample gradients [B, *param.shape] of the parameters ``names`` from ``prepare``'s
        result and the output gradient ``dy``; ``pnames`` maps a full parameter name to its
        attribute on the module ("weight", "bias"). Rules with cheap diagonals override this
        (checked by :func:`register`)."""
        raise TypeError(f"{type(self).__name__} names diagonal parameters but defines no per_sample")


def _with_bias(a: torch.Tensor, s: torch.Tensor, n: float) -> torch.Tensor:
    """[[a, s], [sᵀ, n]]."""
    out = a.new_empty(a.shape[0] + 1, a.shape[1] + 1)
    out[:-1, :-1] = a
    out[:-1, -1] = s
    out[-1, :-1] = s
    out[-1, -1] = float(n)
    return out


def register(cls: type[LayerRule]) -> type[LayerRule]:
    """Class decorator: add a rule to the registry (later registrations take precedence).
    A rule that covers a Kronecker block must say how to build both factors, and one that names
    diagonal parameters must give their per-sample gradients."""
    def own(*names):
        return any(getattr(cls, n) is not getattr(LayerRule, n) for n in names)

    if own("kron") and not (own("a_rows", "a_factor") and own("g_rows", "g_factor")):
        raise TypeError(f"{cls.__name__}: a Kronecker rule needs a_rows or a_factor, and g_rows or g_factor")
    if own("diag_params") and not own("per_sample"):
        raise TypeError(f"{cls.__name__}: a rule with diagonal parameters needs per_sample")
    _RULES.insert(0, cls())
    return cls


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s type, or None."""
    for r in _RULES:
        if isinstance(module, r.types):
            return r
    return None


def _local(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def kron_blocks(model: nn.Module, layout: Layout) -> tuple[list[KronBlock], list[str]]:
    """The Kronecker blocks the layout covers (nn.Linear, nn.Conv2d, ...), and the parameters
    left over (which get a diagonal: a cheap rule where one exists, else the vmap fallback)."""
    blocks, covered = [], set()
    for name, mod in model.named_modules():
        r = rule_for(mod)
        if r is None:
            continue
        b = r.kron(name, mod, layout)
        if b is not None:
            blocks.append(b)
            covered.update({b.weight} | ({b.bias} if b.bias else set()))
    return blocks, [n for n in layout.names if n not in covered]


def diag_plan(model: nn.Module, layout: Layout, diag_names) -> tuple[dict[str, list[str]], list[str]]:
    """Split the diagonal parameters into {module name: params with a cheap rule} and the rest
    (the per-sample vmap fallback)."""
    want = set(diag_names)
    cheap: dict[str, list[str]] = {}
    taken: set[str] = set()
    for name, mod in model.named_modules():
        r = rule_for(mod)
        if r is None:
            continue
        own = [p for p in r.diag_params(name, mod, layout, taken) if p in want]
        if own:
            cheap[name] = own
            taken.update(own)
    return cheap, [n for n in diag_names if n not in taken]


def refuse(msg: str) -> None:
    raise UnsupportedTrainingError(msg)
