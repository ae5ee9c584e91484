"""Curvature of the training loss at a point (docs/math.md): K-FAC factors per layer
(nn.Linear; nn.Conv2d by KFC; nn.Embedding with its exactly diagonal input factor;
nn.MultiheadAttention's packed and output projections), closed-form diagonals for normalisation layers and leftover
biases, a per-sample vmap diagonal for anything else (eval mode), or the dense Hessian for
tiny models; and the retained preconditioner P = curvature((n·full − forget)/(n − r)) + λI in
its eigenbasis (§2.2).

One module per layer type (``linear``, ``conv2d``, ``norm``, ``embedding``, ``attention``), each a :class:`LayerRule` in the
``registry``; ``outputs`` holds the output-side pseudo-gradients (ggn / mc / empirical),
``passes`` the data pass, ``eigen`` the eigenbasis."""
from .layout import KronBlock, Layout
from .registry import (MAX_FACTOR_BYTES, LayerRule, diag_plan, kron_blocks, register, rule_for,
                       shared_params)
from . import linear, conv2d, norm, embedding, attention  # noqa: F401  (register the built-in rules)
from .outputs import FISHERS, auto_fisher, pseudo_grads
from .passes import (PASS_BATCH_SIZE, PassSums, data_pass, dense_hessian, ggn_quadratic, norm_train_mode, pass_batch_size,
                     pass_mode, recalibrate_norm_stats, trace_scale, trace_scales)
from .eigen import EigenBlock, Preconditioner, eigh_psd

__all__ = [
    "Layout", "KronBlock", "LayerRule", "register", "rule_for", "kron_blocks", "diag_plan",
    "MAX_FACTOR_BYTES", "shared_params",
    "FISHERS", "auto_fisher", "pseudo_grads", "PASS_BATCH_SIZE", "pass_batch_size", "PassSums",
    "trace_scale", "trace_scales", "data_pass", "dense_hessian", "ggn_quadratic", "norm_train_mode",
    "pass_mode", "recalibrate_norm_stats", "EigenBlock", "Preconditioner", "eigh_psd",
]
