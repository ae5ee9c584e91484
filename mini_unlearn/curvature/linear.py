"""nn.Linear: K-FAC on its [d_out, d_in (+1)] weight. Inputs of shape [B, ..., d_in] (sequences)
use the "expand" setting: every position is a row, A averages over a sample's positions."""
from __future__ import annotations

import torch
from torch import nn

from .layout import KronBlock, Layout
from .registry import LayerRule, _local, register


@register
class LinearRule(LayerRule):
    types = (nn.Linear,)
    per_sample_attrs = ("weight", "bias")

    def kron(self, name: str, module: nn.Linear, layout: Layout) -> KronBlock | None:
        w, b = _local(name, "weight"), _local(name, "bias")
        if w not in layout.index:
            return None
        bias = b if (module.bias is not None and b in layout.index) else None
        return KronBlock(name, w, bias, module.out_features, module.in_features)

    def diag_params(self, name, module, layout, taken):
        w, b = _local(name, "weight"), _local(name, "bias")
        # a bias whose weight has no block (a frozen weight, or one tied to another module)
        # still has a cheap rule
        return [b] if (module.bias is not None and (w not in layout.index or w in taken)
                       and b in layout.index and b not in taken) else []

    def a_rows(self, module, x):
        rows = x.reshape(-1, x.shape[-1])
        return rows, rows.shape[0] // max(1, x.shape[0]) if x.dim() > 1 else 1

    def g_rows(self, module, dy):
        return dy.reshape(-1, dy.shape[-1])

    def per_sample(self, module, prep, dy, names, pnames):
        """bias: Σ_t δ_t; weight (a tied use): Σ_t δ_t x_tᵀ, [B, d_out, d_in]."""
        d = dy.reshape(dy.shape[0], -1, dy.shape[-1])
        out = {}
        for n in names:
            if pnames[n] == "bias":
                out[n] = d.sum(1)
            else:
                x = prep.reshape(prep.shape[0], -1, prep.shape[-1])
                out[n] = torch.bmm(d.transpose(1, 2), x)
        return out
