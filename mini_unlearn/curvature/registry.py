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

A layer with several weight matrices (nn.MultiheadAttention) returns several blocks from
``kron_all`` and captures its own inputs/outputs (``capture``). A factor whose dense size would
exceed ``MAX_FACTOR_BYTES`` (e.g. the [V, V] output factor of a language-model head) is kept as
its diagonal. A parameter shared by several modules (tied embedding / head weights) gets no
Kronecker block: its exact per-sample gradient is the sum of every use's (``per_sample_attrs``),
squared and summed (a diagonal); without closed forms for every use it falls back to the
per-sample vmap of the whole model, which ties the uses by construction.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedTrainingError
from .layout import KronBlock, Layout

_RULES: list["LayerRule"] = []

#: Largest K-FAC factor (bytes, float32) kept dense; a larger one is kept as its diagonal.
#: 64 MiB is a 4096×4096 factor: every hidden layer of the models here stays dense, a language
#: model's [V, V] output factor with V > 4096 does not (docs/math.md, "Memory bound").
MAX_FACTOR_BYTES = 64 * 2 ** 20


class LayerRule:
    """How one layer type contributes to the curvature. Subclasses set ``types``."""

    types: tuple[type[nn.Module], ...] = ()
    #: the rule covers the module's children's parameters too (their own rules are not asked)
    owns_children: bool = False
    #: parameter attributes whose per-sample gradient ``per_sample`` gives for any use of the
    #: layer, so that a parameter tied to another module can sum its uses' gradients
    per_sample_attrs: tuple[str, ...] = ()

    def kron_all(self, name: str, module: nn.Module, layout: Layout) -> list[KronBlock]:
        """Every Kronecker block of this layer (default: ``kron``'s, if any)."""
        b = self.kron(name, module, layout)
        return [] if b is None else [b]

    def capture(self, module: nn.Module, record) -> list:
        """Install what captures the layer's (input, output) pairs during a curvature pass:
        ``record(part, x, y)`` with ``part`` None for a single-block layer (the block keyed by
        the module's name) or the suffix of the block key ("in_proj" -> "<module>.in_proj").
        ``y`` must be the tensor the loss depends on (its gradient is δ). Returns hook handles."""
        return [module.register_forward_hook(lambda m, i, o: record(None, i[0], o))]

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

    #: Rules whose Kronecker factors are calibrated to the per-sample curvature's trace define
    #: ``position_traces`` (see conv2d.py and :func:`mini_unlearn.curvature.passes.trace_scale`).
    position_traces = None

    def a_diag_factor(self, module: nn.Module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """The diagonal of ``a_factor`` as a vector [cols] (never the dense matrix)."""
        rows, T = self.a_rows(module, x)
        a = rows.pow(2).sum(0)
        if bias:
            a = torch.cat([a, a.new_full((1,), float(rows.shape[0]))])
        return a / T

    def g_diag_factor(self, module: nn.Module, dy: torch.Tensor) -> torch.Tensor:
        """The diagonal of ``g_factor`` as a vector [d_out]."""
        return self.g_rows(module, dy).pow(2).sum(0)

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

    if own("kron", "kron_all") and not (own("a_rows", "a_factor") and own("g_rows", "g_factor")):
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


def shared_params(model: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """Parameters used by more than one module: {canonical name (as ``named_parameters``
    reports it): [(module name, attribute), ...]} (tied embedding / head weights)."""
    canon = {id(p): n for n, p in model.named_parameters()}
    uses: dict[int, list[tuple[str, str]]] = {}
    for mname, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            uses.setdefault(id(p), []).append((mname, attr))
    return {canon[i]: u for i, u in uses.items() if len(u) > 1 and i in canon}


def _owned(model: nn.Module) -> set[str]:
    """Names of modules inside a module whose rule covers its children (owns_children)."""
    out: set[str] = set()
    for name, mod in model.named_modules():
        r = rule_for(mod)
        if r is not None and r.owns_children and name not in out:
            out.update(_local(name, c) for c, _ in mod.named_modules() if c)
    return out


def kron_blocks(model: nn.Module, layout: Layout, max_factor_bytes: int | None = None
                ) -> tuple[list[KronBlock], list[str]]:
    """The Kronecker blocks the layout covers (nn.Linear, nn.Conv2d, nn.Embedding,
    nn.MultiheadAttention, ...), and the parameters left over (which get a diagonal: a cheap rule
    where one exists, else the vmap fallback). A factor larger than ``max_factor_bytes``
    (default :data:`MAX_FACTOR_BYTES`) as a dense float32 matrix is kept as its diagonal.
    Parameters shared by several modules get no block (see the module docstring)."""
    limit = MAX_FACTOR_BYTES if max_factor_bytes is None else int(max_factor_bytes)
    tied = set(shared_params(model))
    inner = _owned(model)
    blocks, covered = [], set()
    for name, mod in model.named_modules():
        r = rule_for(mod)
        if r is None or name in inner:
            continue
        for b in r.kron_all(name, mod, layout):
            if b.weight in tied or b.bias in tied or b.weight in covered:
                continue
            b.a_diag = b.a_diag or 4 * b.cols ** 2 > limit
            b.g_diag = b.g_diag or 4 * b.d_out ** 2 > limit
            blocks.append(b)
            covered.update({b.weight} | ({b.bias} if b.bias else set()))
    return blocks, [n for n in layout.names if n not in covered]


def diag_plan(model: nn.Module, layout: Layout, diag_names) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split the diagonal parameters into {module name: {parameter name: its attribute on the
    module}} for the ones with a cheap rule, and the rest (the per-sample vmap fallback). A
    parameter shared by several modules is cheap only if every use has a closed form; its uses'
    per-sample gradients are then summed before squaring."""
    want = set(diag_names)
    cheap: dict[str, dict[str, str]] = {}
    taken: set[str] = set()
    mods = dict(model.named_modules())
    inner = _owned(model)
    for canon, uses in shared_params(model).items():
        if canon not in want:
            continue
        taken.add(canon)  # cheap or vmap, never a single use's rule alone
        rules = [rule_for(mods[m]) for m, _ in uses]
        if all(r is not None and a in r.per_sample_attrs and m not in inner
               for r, (m, a) in zip(rules, uses)):
            for m, a in uses:
                cheap.setdefault(m, {})[canon] = a
    vmap = {c for c in taken if not any(c in d for d in cheap.values())}
    for name, mod in model.named_modules():
        r = rule_for(mod)
        if r is None or name in inner:
            continue
        own = [p for p in r.diag_params(name, mod, layout, taken) if p in want]
        if own:
            cheap.setdefault(name, {}).update({p: p.rsplit(".", 1)[-1] for p in own})
            taken.update(own)
    return cheap, [n for n in diag_names if n not in taken or n in vmap]


def refuse(msg: str) -> None:
    raise UnsupportedTrainingError(msg)
