"""Normalisation layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm): a diagonal
for their affine parameters from closed-form per-sample gradients, y = γ·x̂ + β:

    ∂ℓ_i/∂γ = Σ_positions x̂_i ⊙ δ_i,     ∂ℓ_i/∂β = Σ_positions δ_i

with δ the gradient at the layer's output (one backward for the whole batch) and x̂ recomputed
from the layer's input with the statistics the forward used (batch statistics in train mode,
running statistics in eval mode). In train mode BatchNorm couples the samples of a batch
through its statistics; the rule then uses sample i's own x̂_i, δ_i (the usual per-example
approximation), where a per-sample vmap of the whole model is not even defined."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .registry import LayerRule, _local, register

_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def uses_batch_stats(m: nn.Module) -> bool:
    """Whether a BatchNorm normalises by the batch's statistics in its current mode."""
    return isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)


@register
class NormRule(LayerRule):
    types = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm) + _RMS

    def diag_params(self, name, module, layout, taken):
        return [n for n in (_local(name, "weight"), _local(name, "bias"))
                if n in layout.index and n not in taken]

    @staticmethod
    def normalized(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x̂: the input normalised as the layer's forward did, without its affine map."""
        if isinstance(m, _BatchNorm):
            if uses_batch_stats(m):  # the native kernel: a strided var_mean is several times slower
                return F.batch_norm(x, None, None, training=True, momentum=0.0, eps=m.eps)
            return F.batch_norm(x, m.running_mean, m.running_var, training=False, eps=m.eps)
        if isinstance(m, _InstanceNorm):
            use_input = m.training or not m.track_running_stats
            return F.instance_norm(x, None if use_input else m.running_mean,
                                   None if use_input else m.running_var,
                                   use_input_stats=use_input, momentum=0.0, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        return F.rms_norm(x, m.normalized_shape, eps=m.eps)  # RMSNorm

    def _from_output_ok(self, module, w, b) -> bool:
        """Whether x̂ can be read from the output (γ away from 0, β/γ moderate): decided once per
        weight version, so the batch loop does not sync with the device."""
        cache = self.__dict__.setdefault("_ok", {})
        key = (id(module), module.weight._version, getattr(module.bias, "_version", None))
        if key not in cache:
            aw = w.abs()
            cache.clear() if len(cache) > 256 else None
            cache[key] = not (float(aw.min()) < 1e-2 or float((b.abs() / aw).max()) > 1e2)
        return cache[key]

    def prepare(self, module, x, y):
        """x̂ = (y − β)/γ from the output (one elementwise pass) where γ is safely away from 0
        and β/γ is moderate; otherwise recomputed from the input with the layer's statistics."""
        w = getattr(module, "weight", None)
        if w is None or not torch.is_tensor(y) or y.shape != x.shape:
            return self.normalized(module, x)
        w = w.detach().float()
        b = getattr(module, "bias", None)
        b = torch.zeros_like(w) if b is None else b.detach().float()
        if not self._from_output_ok(module, w, b):
            return self.normalized(module, x)
        if isinstance(module, (nn.LayerNorm,) + _RMS):
            return (y - b) / w
        shape = [1, -1] + [1] * (y.dim() - 2)
        return (y - b.view(shape)) / w.view(shape)

    def per_sample(self, module, xhat, dy, names, pnames):
        channel_last = isinstance(module, (nn.LayerNorm,) + _RMS)
        if channel_last:  # affine over the trailing normalized_shape: sum the dims in between
            k = len(module.normalized_shape)
            dims = tuple(range(1, dy.dim() - k))
        else:  # affine over channels (dim 1): sum the spatial dims
            dims = tuple(range(2, dy.dim()))

        def red(t):
            return t.sum(dims) if dims else t

        out = {}
        for n in names:
            if pnames[n] == "bias":
                out[n] = red(dy)
            else:
                out[n] = red(xhat * dy)
        return out
