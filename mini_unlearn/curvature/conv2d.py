"""nn.Conv2d: Kronecker factors for convolution (KFC, Grosse & Martens 2016).

The weight is the [out, in·kh·kw] matrix (+ a bias column) that multiplies the unfolded input
patches: per sample, ∇W = Σ_t δ_t ã_tᵀ over the T output positions. Under KFC's spatial
homogeneity and uncorrelated-derivative assumptions the per-sample curvature is
T·E_t[ããᵀ] ⊗ E_t[δδᵀ] = (1/T) Σ_t ããᵀ ⊗ Σ_t δδᵀ, which is what the pass sums (A averages over
positions, G sums). A conv with a single output position is exactly the equivalent Linear.
Only groups=1 is supported.

Cost: A's products are (in·kh·kw)/out times the conv's own forward FLOPs (4.5× for a
16→32 3×3 conv), the largest term of a CNN's curvature pass. Under the same spatial homogeneity
KFC already assumes, the mean over positions is estimated on a regular sub-grid of at most
``Conv2dRule.max_positions`` output positions per sample (the grid's stride grows by whole
steps; None: every position). The sub-grid is the same for every sample, so a forget pass
subtracts exactly the terms the full pass added. benchmarks/bench_curvature.py reports the
resulting A's deviation from the all-positions A.

**Trace calibration.** KFC's assumption that the derivatives at different positions are
uncorrelated fails for a classifier whose loss depends on the image as a whole: measured on a
BatchNorm CNN, the exact per-sample Fisher's diagonal in KFC's own eigenbasis sums to 18x and 8x
KFC's eigenvalues for its two convolutions (benchmarks/study_linearity.py), so the unlearning
step overshot along directions KFC called flat. ``finalize``'s pass therefore also sums, on a
sample of the data (the first few samples of every batch, at least ``TRACE_SAMPLES`` in all:
forming per-sample gradients over every position costs about half a millisecond per image
here), the trace of the exact per-sample curvature, ‖Σ_t δ_t ã_tᵀ‖²_F (rotation invariant: no
basis needed), and of KFC's model of it, (1/T) Σ_t ‖ã_t‖² · Σ_t ‖δ_t‖² (``position_traces``).
Their ratio c (:func:`mini_unlearn.curvature.passes.trace_scale`; ``meta["kfac_traces"]``)
scales G wherever the log's curvature is used: the retained curvature, and the forget set's in
the linearity check (c is a property of the layer on this data: 17.6-18.2 and 7.7-7.9 on the
retained sets of 30 % and 50 % forget splits). The ratio corrects only the position
assumption: with T = 1 it is exactly 1, so a convolution with one output position stays the
equivalent Linear. Factor sums stay raw (additive over disjoint data)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import KronBlock, Layout
from .registry import LayerRule, _local, _with_bias, refuse, register


@register
class Conv2dRule(LayerRule):
    types = (nn.Conv2d,)
    max_positions: int | None = 64  # output positions per sample used for A (None: all)

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

    def patches(self, module: nn.Conv2d, x: torch.Tensor, sub: int = 1) -> torch.Tensor:
        """The unfolded input [B, in·kh·kw, T] (every ``sub``-th output position per axis)."""
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        stride = tuple(st * sub for st in module.stride)
        return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=stride)

    def subgrid(self, module: nn.Conv2d, x: torch.Tensor) -> int:
        """The sub-grid step: 1 if the output has at most ``max_positions`` positions."""
        if self.max_positions is None:
            return 1
        h, w = x.shape[-2:]
        kh, kw = module.kernel_size
        ph, pw = (0, 0) if isinstance(module.padding, str) else module.padding
        if module.padding == "same":
            ph, pw = (module.dilation[0] * (kh - 1)) // 2, (module.dilation[1] * (kw - 1)) // 2
        oh = (h + 2 * ph - module.dilation[0] * (kh - 1) - 1) // module.stride[0] + 1
        ow = (w + 2 * pw - module.dilation[1] * (kw - 1) - 1) // module.stride[1] + 1
        s = 1
        while -(-oh // s) * -(-ow // s) > self.max_positions:
            s += 1
        return s

    def a_rows(self, module, x):
        p = self.patches(module, x)
        return p.transpose(1, 2).reshape(-1, p.shape[1]), p.shape[-1]

    def a_factor(self, module, x, bias):
        p = self.patches(module, x, self.subgrid(module, x))  # batched: no transposed copy
        a = torch.bmm(p, p.transpose(1, 2)).sum(0)
        if bias:
            a = _with_bias(a, p.sum((0, 2)), p.shape[0] * p.shape[2])
        return a / p.shape[-1]

    def g_rows(self, module, dy):
        if dy.dim() == 3:
            dy = dy.unsqueeze(0)
        return dy.flatten(2).transpose(1, 2).reshape(-1, dy.shape[1])

    def g_factor(self, module, dy):
        if dy.dim() == 3:
            dy = dy.unsqueeze(0)
        d = dy.flatten(2)
        return torch.bmm(d, d.transpose(1, 2)).sum(0)

    def position_traces(self, module, x, dy, bias):
        """[Σ_i ‖Σ_t δ_it ã_itᵀ‖²_F, Σ_i (1/T) Σ_t ‖ã_it‖² · Σ_t ‖δ_it‖², B] over the batch: the
        trace of the exact per-sample curvature of the block, of KFC's per-sample model of it
        (positions uncorrelated), and the sample count, for the trace calibration. The first two
        are equal when T = 1."""
        if dy.dim() == 3:
            dy, x = dy.unsqueeze(0), x.unsqueeze(0)
        p = self.patches(module, x)  # [B, in·kh·kw, T]: every position
        d = dy.flatten(2)  # [B, out, T]
        T = p.shape[-1]
        exact = torch.bmm(d, p.transpose(1, 2)).pow(2).sum()
        a2 = p.pow(2).sum((1, 2))
        if bias:
            exact = exact + d.sum(2).pow(2).sum()
            a2 = a2 + T
        model = (a2 * d.pow(2).sum((1, 2))).sum() / T
        return torch.stack([exact, model, exact.new_tensor(float(d.shape[0]))])

    def per_sample(self, module, prep, dy, names, pnames):
        return {n: dy.sum((2, 3)) for n in names}
