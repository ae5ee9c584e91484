"""Evaluation of language models after unlearning: per-sequence token log-probabilities,
per-document perplexity, and two membership attacks on sequences.

* **Loss attack**: a sequence's score is minus its mean token loss (members have lower loss).
* **Min-K%-Prob** (Shi et al., 2024, "Detecting Pretraining Data from Large Language Models"):
  a sequence's score is the mean log-probability of its ``k`` fraction of *least likely* target
  tokens (at least one token); members have fewer very unlikely tokens.

Each attack's AUC is that of separating forgotten sequences (positives) from held-out
sequences (negatives) by the score: 0.5 means no separation. The two sets come from different
documents, so even a model that never saw the forgotten text may sit away from 0.5: the
retrained model's AUC is the floor an unlearning method is compared with.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .text import IGNORE_INDEX

__all__ = ["token_logprobs", "sequence_loss_scores", "min_k_prob_scores", "auc",
           "doc_perplexities", "perplexity_of"]


@torch.no_grad()
def token_logprobs(model: nn.Module, X: Tensor, Y: Tensor, batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """``(logp, mask)``: ``[N, T]`` float64 log-probabilities of every target token under
    ``model`` (eval mode for the duration; the mode is restored) and the bool mask of real targets
    (``Y != -100``; masked entries of ``logp`` are 0)."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, X.shape[0], batch_size):
            yb = Y[i:i + batch_size]
            lp = torch.log_softmax(model(X[i:i + batch_size]).double(), -1)
            out.append(lp.gather(-1, yb.clamp_min(0).unsqueeze(-1)).squeeze(-1))
    finally:
        model.train(was)
    mask = Y != IGNORE_INDEX
    logp = torch.cat(out) if out else torch.zeros(Y.shape, dtype=torch.float64)
    return logp.masked_fill(~mask, 0.0), mask


def sequence_loss_scores(logp: Tensor, mask: Tensor) -> Tensor:
    """Loss-attack score of each sequence: its mean target-token log-probability (= minus its mean
    loss; higher = more member-like). Sequences without targets get NaN."""
    n = mask.sum(1)
    s = logp.sum(1) / n.clamp_min(1)
    return s.masked_fill(n == 0, float("nan"))


def min_k_prob_scores(logp: Tensor, mask: Tensor, k: float = 0.2) -> Tensor:
    """Min-K%-Prob score of each sequence: the mean of its ``ceil(k * n)`` lowest target-token
    log-probabilities (``n`` its real targets, at least one token taken). Higher = more
    member-like. Sequences without targets get NaN. Raises ValueError unless ``0 < k <= 1``."""
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    out = torch.full((logp.shape[0],), float("nan"), dtype=torch.float64)
    for i in range(logp.shape[0]):
        v = logp[i][mask[i]]
        if v.numel():
            m = max(1, math.ceil(float(k) * v.numel()))
            out[i] = torch.sort(v.double()).values[:m].mean()
    return out


def auc(pos: Tensor, neg: Tensor) -> float:
    """Area under the ROC curve of scores ``pos`` (positives) against ``neg``: the probability a
    random positive outscores a random negative, ties counted half (Mann-Whitney U). NaN scores
    are dropped. Raises ValueError if either side is then empty."""
    p = pos[~torch.isnan(pos)].double()
    q = neg[~torch.isnan(neg)].double()
    if p.numel() == 0 or q.numel() == 0:
        raise ValueError("auc needs at least one positive and one negative score")
    allv = torch.cat([p, q])
    order = torch.argsort(allv)
    sv = allv[order]
    ranks = torch.empty_like(allv)
    _, inv, counts = torch.unique_consecutive(sv, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks[order] = (ends - (counts.double() - 1) / 2)[inv]  # 1-based ranks, ties averaged
    u = ranks[:p.numel()].sum() - p.numel() * (p.numel() + 1) / 2
    return float(u / (p.numel() * q.numel()))


def perplexity_of(logp: Tensor, mask: Tensor) -> float:
    """``exp`` of the token-weighted mean loss over every real target in ``(logp, mask)``."""
    n = int(mask.sum())
    if n == 0:
        raise ValueError("perplexity: no target tokens")
    return math.exp(-float(logp[mask].sum()) / n)


def doc_perplexities(logp: Tensor, mask: Tensor, doc_ids: Tensor) -> dict[int, float]:
    """Perplexity of each document (token-weighted over its sequences): ``{doc id: ppl}``."""
    return {int(d): perplexity_of(logp[doc_ids == d], mask[doc_ids == d])
            for d in torch.unique(doc_ids).tolist()}
