"""nn.Embedding: K-FAC with an exactly diagonal input factor.

An embedding is a linear layer on one-hot inputs: y_t = Wᵀ e_{x_t} with W the [V, d] weight,
so per sample ∇W = Σ_t e_{x_t} δ_tᵀ. As a Kronecker block it is the [d, V] matrix Wᵀ
(``KronBlock.transposed``) with

    A = Σ_i (1/T) Σ_t e_{x_t} e_{x_t}ᵀ = diag(token counts) / T,      G = Σ_i Σ_t δ δᵀ  [d, d]

The input factor is diagonal *exactly* (one-hot outer products have no off-diagonal terms), so
it is stored as the count vector: K-FAC costs O(V + d²) memory here and keeps the correlations
between embedding dimensions that a plain diagonal would drop; the only approximation is
K-FAC's own (δ independent of which token was seen). The closed-form exact diagonal
Σ_i (Σ_{t: x_t = v} δ_t)² would be the alternative; it is what a *tied* embedding gets (see
below), where the weight also receives the output head's gradient.

A row at ``padding_idx`` never receives a gradient: its counts are zeroed. ``max_norm``
(renormalises the weight inside the forward) and ``scale_grad_by_freq`` (scales the gradient by
the batch's token frequencies, coupling the samples) are refused.

Tied weights (the same Parameter in an nn.Embedding and an output nn.Linear): the weight's
per-sample gradient is the sum of both uses', Σ_t e_{x_t} δ_tᵀ + Σ_t g_t h_tᵀ, which is no
single Kronecker product. The registry gives such a parameter no block; each use supplies its
exact per-sample gradient (``per_sample`` here: a scatter of δ into the token rows; the Linear's:
a batched outer product), they are summed and squared: the exact diagonal of the curvature,
cross terms between the two uses included.
"""
from __future__ import annotations

import torch
from torch import nn

from .layout import KronBlock, Layout
from .registry import LayerRule, _local, refuse, register


def _check(name: str, module: nn.Embedding) -> None:
    if module.max_norm is not None:
        refuse(f"Embedding {name!r} has max_norm={module.max_norm}: it renormalises its weight inside "
               f"the forward, which the curvature does not model. Use max_norm=None")
    if module.scale_grad_by_freq:
        refuse(f"Embedding {name!r} has scale_grad_by_freq=True: its gradient depends on the whole "
               f"batch's token frequencies, so per-sample curvature is not defined. Use False")


@register
class EmbeddingRule(LayerRule):
    types = (nn.Embedding,)
    per_sample_attrs = ("weight",)

    def kron(self, name: str, module: nn.Embedding, layout: Layout) -> KronBlock | None:
        w = _local(name, "weight")
        if w not in layout.index:
            return None
        _check(name, module)
        return KronBlock(name, w, None, module.embedding_dim, module.num_embeddings, a_diag=True,
                         transposed=True)

    @staticmethod
    def _counts(module: nn.Embedding, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        T = ids[0].numel() if ids.dim() > 1 else 1
        c = torch.bincount(ids.reshape(-1).long(), minlength=module.num_embeddings).float()
        if module.padding_idx is not None:
            c[module.padding_idx] = 0.0
        return c, T

    def a_diag_factor(self, module, x, bias):
        c, T = self._counts(module, x)
        return c / T

    def a_factor(self, module, x, bias):
        """The dense diag(counts)/T (only for a layout that asks for it: V×V)."""
        return torch.diag(self.a_diag_factor(module, x, bias))

    def g_rows(self, module, dy):
        return dy.reshape(-1, dy.shape[-1])

    def per_sample(self, module, prep, dy, names, pnames):
        """weight: Σ_t e_{x_t} δ_tᵀ per sample, [B, V, d] (a scatter-add of δ into token rows)."""
        _check("", module)
        ids = prep.long().reshape(prep.shape[0], -1)
        B, V = ids.shape[0], module.num_embeddings
        d = dy.reshape(B, -1, dy.shape[-1])
        flat = d.new_zeros(B * V, d.shape[-1])
        rows = (ids + torch.arange(B, device=ids.device)[:, None] * V).reshape(-1)
        flat.index_add_(0, rows, d.reshape(-1, d.shape[-1]))
        g = flat.view(B, V, -1)
        if module.padding_idx is not None:
            g[:, module.padding_idx] = 0.0
        return {n: g for n in names}
