"""The output side of the curvature: vectors v with Σ_v v vᵀ = (an estimate of) the Hessian of
the batch's summed loss w.r.t. the model's outputs, each backpropagated once.

Outputs are [B, C] logits or [B, ..., V] (sequences: every position is a prediction, classes on
the last axis). The per-position scale is read off the loss the caller actually used: for a
softmax cross-entropy, ∂loss/∂logits_t = s·(p_t − e_{y_t}), so s = 1 for a mean over samples,
1/T for a mean over a sequence's T tokens, and 0 at ignored targets (y outside [0, V))."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedTrainingError

FISHERS = ("ggn", "mc", "empirical")
GGN_MAX_CLASSES = 64  # fisher="auto": the exact GGN up to this many outputs (one backward each) ...


def auto_fisher(model: torch.nn.Module, num_outputs: int) -> str:
    """What ``fisher="auto"`` picks: the exact per-class GGN for up to ``GGN_MAX_CLASSES``
    outputs on models without convolutions, else the one-draw Monte-Carlo Fisher. The GGN costs
    one backward per class; through convolutions that is 7-10x a training epoch for 10 classes
    (benchmarks/bench_curvature.py), against the <= 2x budget the MC Fisher keeps."""
    conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    return "ggn" if num_outputs <= GGN_MAX_CLASSES and not conv else "mc"


def _check(out: torch.Tensor, y: torch.Tensor, fisher: str) -> None:
    if out.dim() < 2 or not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() \
            or tuple(y.shape) != tuple(out.shape[:-1]):
        raise UnsupportedTrainingError(
            f"fisher={fisher!r} assumes a softmax cross-entropy with integer class targets of shape "
            f"outputs.shape[:-1] (classes on the last axis); got outputs {tuple(out.shape)} and targets "
            f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}. Use fisher='empirical' for "
            f"other losses")


def _scale(p: torch.Tensor, yc: torch.Tensor, valid: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """s with ∂loss/∂logits ≈ s·(p − e_y) over the valid positions (least squares), as a
    0-dim tensor on the device (no host sync in the batch loop). ``yc`` [..., 1] the clamped
    targets, ``valid`` [..., 1] 0/1; no one-hot [..., V] tensor is built (V can be large):
    Σ r² = Σ_valid (Σ_c p_c² − 2 p_y + 1), Σ g·r = Σ_valid (Σ_c g_c p_c − g_y)."""
    g = g_out.float()
    den = ((p * p).sum(-1, keepdim=True) - 2 * p.gather(-1, yc) + 1.0).mul(valid).sum()
    num = ((g * p).sum(-1, keepdim=True) - g.gather(-1, yc)).mul(valid).sum()
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(den)).clamp_min(0)


def sample_uniforms(x, n: int, draws: int, positions: int, seed: int, device) -> torch.Tensor:
    """Uniforms [draws, n, positions] that depend only on each sample's content and ``seed``:
    a forget sample gets the same draws in the full-data pass and in the forget pass, so the
    retained curvature (n·full − forget) cancels its terms exactly."""
    if torch.is_tensor(x) and x.shape[0] == n:
        flat = x.reshape(n, -1).to(torch.float64)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        proj = torch.randn(flat.shape[1], generator=gen, dtype=torch.float64).to(flat.device)
        key = (flat @ proj).to(device)  # one number per sample
    else:
        gen = torch.Generator().manual_seed(int(seed) + 1)
        key = torch.rand(n, generator=gen, dtype=torch.float64).to(device) * 1e3
    j = torch.arange(draws * positions, dtype=torch.float64, device=device).view(draws, 1, positions)
    h = torch.sin(key.view(1, n, 1) * 12.9898 + (j + 1.0) * 78.233 + float(seed) * 0.61803398875)
    return torch.frac(torch.abs(h * 43758.5453123))


def pseudo_grads(out: torch.Tensor, y, g_out: torch.Tensor, fisher: str, *, mc_samples: int = 1,
                 seed: int = 0, x=None) -> list[torch.Tensor]:
    """Vectors v (shaped like ``out``) whose Σ v vᵀ estimates the output-side curvature:

    * "ggn": the exact softmax cross-entropy Hessian s·(diag(p) − ppᵀ) per position, one v per
      class (v_c = √s·√p_c (e_c − p)), so one backward per class;
    * "mc": the Fisher with labels drawn from the model's own softmax, v = √(s/M) (e_ŷ − p),
      M = ``mc_samples`` draws (one backward each; unbiased for "ggn", any number of classes);
    * "empirical": the batch's own loss gradient ``g_out`` (any loss).
    """
    if fisher == "empirical":
        return [g_out.detach()]
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    _check(out, y, fisher)
    V = out.shape[-1]
    p = torch.softmax(out.detach().float(), dim=-1)
    valid = ((y >= 0) & (y < V)).unsqueeze(-1).float()
    yc = y.clamp(0, V - 1).long().unsqueeze(-1)
    s = _scale(p, yc, valid, g_out)  # s = 0 (no dependence) gives zero vectors
    if fisher == "ggn":
        sp = (p * s).sqrt() * valid
        vs = []
        for c in range(V):
            v = -sp[..., c:c + 1] * p
            v[..., c] += sp[..., c]
            vs.append(v.to(out.dtype))
        return vs
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    B = out.shape[0]
    P = p[0].numel() // V
    u = sample_uniforms(x, B, mc_samples, P, seed, p.device).view(mc_samples, *p.shape[:-1], 1)
    cdf = p.double().cumsum(-1)
    vs = []
    k = (s / mc_samples).sqrt()
    w = k * valid  # [..., 1]
    for m in range(mc_samples):
        yhat = torch.searchsorted(cdf, u[m] * cdf[..., -1:]).clamp_max(V - 1)
        v = p * -w  # √(s/M)(e_ŷ − p) at valid positions, built without a one-hot [..., V] tensor
        v.scatter_add_(-1, yhat, w)
        vs.append(v.to(out.dtype))
    return vs
