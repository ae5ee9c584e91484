"""nn.MultiheadAttention (and so nn.TransformerEncoderLayer / TransformerDecoderLayer's
self-attention): K-FAC for its packed q/k/v projection and its output projection.

MultiheadAttention applies ``in_proj_weight`` [3E, E] (+ ``in_proj_bias``) and
``out_proj.weight`` [E, E] (+ bias) functionally, so no forward hook fires on ``out_proj`` and
neither projection's input or output is visible from outside. During a curvature pass this rule
captures them by *re-computation*: a forward hook on the attention module recomputes its
output from its inputs with the same parameters, as explicit operations

    qkv = x W_inᵀ + b_in     (the packed projection: one [3E, E (+1)] Kronecker block)
    a   = softmax(q kᵀ/√d_h + masks) v     per head (dropout as the module applies it)
    y   = a W_outᵀ + b_out   (the output projection: one [E, E (+1)] block)

and returns that output in place of the module's, so the loss depends on ``qkv`` and ``y``
and their gradients δ are read off the same backward as every other layer's. The factors are
then exactly those of an equivalent module built from nn.Linear projections on the same
weights (tests/test_lm_curvature.py). Tensors are kept batch-first internally whatever
``batch_first`` says, so each sample's positions are one row group (A averages over them).

Supported: self-attention (``query``, ``key`` and ``value`` the same tensor), ``batch_first``
either way, ``attn_mask`` (2-D or 3-D, bool or float), ``key_padding_mask``, ``is_causal``
(with its mask, as the module requires), ``need_weights``. Refused with
UnsupportedTrainingError: cross-attention (q from one tensor, k/v from another: the packed
weight's rows would see different inputs, which is no single Kronecker block), separate
q/k/v weights (kdim/vdim ≠ embed_dim), add_bias_kv, add_zero_attn, unbatched inputs, and
recording only some of the module's projection parameters.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layout import KronBlock, Layout
from .linear import LinearRule
from .registry import _local, refuse, register

_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
           "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v")


def _float_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


@register
class MultiheadAttentionRule(LinearRule):
    types = (nn.MultiheadAttention,)
    owns_children = True  # out_proj is covered here: its own hooks never fire
    per_sample_attrs = ()

    def kron_all(self, name: str, module: nn.MultiheadAttention, layout: Layout) -> list[KronBlock]:
        names = {a: _local(name, a) for a in _PARAMS}
        present = [a for a, n in names.items() if n in layout.index]
        if not present:
            return []
        if not module._qkv_same_embed_dim:
            refuse(f"MultiheadAttention {name!r} has separate q/k/v weights (kdim/vdim != embed_dim): "
                   f"only the packed in_proj_weight is supported")
        if module.bias_k is not None or module.add_zero_attn:
            refuse(f"MultiheadAttention {name!r} uses add_bias_kv/add_zero_attn, which the curvature "
                   f"rule does not model")
        want = ["in_proj_weight", "out_proj.weight"] + \
            (["in_proj_bias", "out_proj.bias"] if module.in_proj_bias is not None else [])
        missing = [a for a in want if a not in present]
        if missing:
            refuse(f"MultiheadAttention {name!r}: parameters {[names[a] for a in missing]} are not "
                   f"recorded but {[names[a] for a in present]} are; record all of its projection "
                   f"parameters or none (Recorder(params=[...]))")
        E = module.embed_dim
        has_b = module.in_proj_bias is not None
        return [KronBlock(_local(name, "in_proj"), names["in_proj_weight"],
                          names["in_proj_bias"] if has_b else None, 3 * E, E, owner=name),
                KronBlock(_local(name, "out_proj"), names["out_proj.weight"],
                          names["out_proj.bias"] if module.out_proj.bias is not None else None, E, E,
                          owner=name)]

    def diag_params(self, name, module, layout, taken):
        return []

    def capture(self, module: nn.MultiheadAttention, record) -> list:
        sig = inspect.signature(type(module).forward)

        def hook(m, args, kwargs, output):
            bound = sig.bind(m, *args, **kwargs)
            bound.apply_defaults()
            return self.forward(m, bound.arguments, record)

        return [module.register_forward_hook(hook, with_kwargs=True)]

    @staticmethod
    def forward(m: nn.MultiheadAttention, a: dict, record=None):
        """The module's forward as explicit operations (batch-first inside); ``record`` gets
        ("in_proj", x, qkv) and ("out_proj", attention output, y)."""
        query, key, value = a["query"], a["key"], a["value"]
        if not (query is key and key is value):
            refuse("MultiheadAttention with different query/key/value tensors (cross-attention, e.g. "
                   "TransformerDecoderLayer.multihead_attn): the packed in_proj weight's q and k/v rows "
                   "see different inputs, which is no single Kronecker block. Leave that module's "
                   "parameters out of the recorded ones (Recorder(params=[...]))")
        if query.dim() != 3:
            refuse(f"MultiheadAttention on an unbatched input {tuple(query.shape)}: per-sample curvature "
                   f"needs a batch dimension")
        x = query if m.batch_first else query.transpose(0, 1)  # [N, L, E]
        N, L, E = x.shape
        h = m.num_heads
        hd = E // h
        qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
        q, k, v = (t.reshape(N, L, h, hd).transpose(1, 2) for t in qkv.split(E, dim=-1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        am = _float_mask(a.get("attn_mask"), scores)
        if am is not None:
            scores = scores + (am.view(1, 1, L, L) if am.dim() == 2 else am.view(N, h, L, L))
        kpm = _float_mask(a.get("key_padding_mask"), scores)
        if kpm is not None:
            scores = scores + kpm.view(N, 1, 1, L)
        w = torch.softmax(scores, dim=-1)
        if m.dropout > 0.0 and m.training:
            w = F.dropout(w, p=m.dropout)
        att = (w @ v).transpose(1, 2).reshape(N, L, E)
        y = F.linear(att, m.out_proj.weight, m.out_proj.bias)
        if record is not None:
            record("in_proj", x, qkv)
            record("out_proj", att, y)
        out = y if m.batch_first else y.transpose(0, 1)
        if not a.get("need_weights", True):
            return out, None
        return out, (w.mean(1) if a.get("average_attn_weights", True) else w)
