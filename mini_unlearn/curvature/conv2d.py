"""nn.Conv2d: Kronecker factors for convolution (KFC, Grosse & Martens 2016).

The weight is the [out, in·kh·kw] matrix (+ a bias column) that multiplies the unfolded input
patches: per sample, ∇W = Σ_t δ_t ã_tᵀ over the T output positions. Under KFC's spatial
homogeneity and uncorrelated-derivative assumptions the per-sample curvature is
T·E_t[ããᵀ] ⊗ E_t[δδᵀ] = (1/T) Σ_t ããᵀ ⊗ Σ_t δδᵀ, which is what the pass sums (A averages over
positions, G sums). A conv with a single output position is exactly the equivalent Linear.
Only groups=1 is supported."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import KronBlock, Layout
from .registry import LayerRule, _local, refuse, register


@register
class Conv2dRule(LayerRule):
    types = (nn.Conv2d,)

    def kron(self, name: str, module: nn.Conv2d, layout: Layout) -> KronBlock | None:
        w, b = _local(name, "weight"), _local(name, "bias")
        if w not in layout.index:
            return None
        if module.groups != 1:
            refuse(f"Conv2d {name!r} has groups={module.groups}: K-FAC covers groups=1 only. "
                   f"Leave its weight out of the recorded parameters (Recorder(params=[...])) "
                   f"or use a groups=1 convolution")
        bias = b if (module.bias is not None and b in layout.index) else None
        kh, kw = module.kernel_size
        return KronBlock(name, w, bias, module.out_channels, module.in_channels * kh * kw)

    def diag_params(self, name, module, layout, taken):
        w, b = _local(name, "weight"), _local(name, "bias")
        return [b] if (module.bias is not None and w not in layout.index and b in layout.index
                       and b not in taken) else []

    def a_rows(self, module: nn.Conv2d, x: torch.Tensor):
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                           stride=module.stride)  # [B, in·kh·kw, T]
        T = patches.shape[-1]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]), T

    def g_rows(self, module, dy):
        if dy.dim() == 3:
            dy = dy.unsqueeze(0)
        return dy.flatten(2).transpose(1, 2).reshape(-1, dy.shape[1])

    def per_sample(self, module, x, dy, names, pnames):
        return {n: dy.sum((2, 3)) for n in names}
