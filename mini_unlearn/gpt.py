"""A small decoder-only transformer (GPT) for byte-level language modelling.

``[B, T]`` int64 token ids -> token + learned position embedding -> ``n_layers`` pre-LayerNorm
blocks (causal self-attention, then a GELU MLP, each on a residual branch) -> LayerNorm ->
linear head -> ``[B, T, V]`` logits. Attention is written with four explicit ``nn.Linear``
projections (``q``, ``k``, ``v``, ``out``), not ``nn.MultiheadAttention``, so forward hooks on
``nn.Linear`` (K-FAC statistics, recorders) see every weight matrix of the model. No dropout:
training is a deterministic function of the initialisation and the batch order.

Build it through :func:`mini_unlearn.models.make_model` (``make_model("gpt", 256, 256, seed,
d_model=..., ...)``) or directly with :class:`GPT` and :class:`GPTConfig`; train it with
:func:`mini_unlearn.models.train` and the ``default_recipe("gpt")`` AdamW recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPTConfig", "GPT", "lm_loss", "perplexity", "IGNORE_INDEX"]

#: Targets equal to this are not counted by :func:`lm_loss` (padding at a document's end).
IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """Size of a :class:`GPT`.

    The defaults (137k parameters) train on the Shakespeare bytes in a few minutes on two CPU
    cores with ``default_recipe("gpt")``.

    Attributes:
        vocab_size: number of token ids (256 for bytes).
        seq_len: longest sequence the position embedding covers.
        d_model: residual width.
        n_layers: transformer blocks.
        n_heads: attention heads (``d_model`` must divide by it).
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        tie_weights: share the head's weight with the token embedding. Off by default: a shared
            parameter belongs to two layers, so it gets no Kronecker block; its curvature is the
            exact diagonal of both uses' summed per-sample gradients (curvature/embedding.py).
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for key in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"GPTConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit q/k/v/out ``nn.Linear`` projections."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.n_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, h, D // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.proj = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx [B, T] int64) -> logits [B, T, V]``.

    Initialisation (GPT-2 style): every Linear and embedding weight ``N(0, 0.02)``, the residual
    output projections (``attn.out``, ``proj``) ``N(0, 0.02 / sqrt(2 n_layers))``, biases 0,
    LayerNorms (1, 0). Draws from the global RNG: :func:`mini_unlearn.models.make_model` seeds it
    in a forked RNG.
    """

    #: Marks a model whose input is integer token ids (see ``models.train``).
    takes_tokens = True

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                scale = 1 / math.sqrt(2 * cfg.n_layers) if name.endswith(("attn.out.weight", "proj.weight")) else 1.0
                nn.init.normal_(p, 0.0, std * scale)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT takes [B, T] integer token ids, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.config.seq_len}")
        # [B, T] position ids (not a broadcast [T]): the position embedding's output then has a
        # batch dimension, so per-sample curvature (K-FAC) can read each sample's gradient
        pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy over every token whose target is not ``ignore_index``.

    ``logits [B, T, V]``, ``targets [B, T]`` int64. (What ``models.loss_fn`` computes for 3-D
    outputs with the default ``ignore_index``.)
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"lm_loss needs logits [B, T, V] and targets [B, T], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


@torch.no_grad()
def perplexity(model: nn.Module, X: Tensor, Y: Tensor, batch_size: int = 64,
               ignore_index: int = IGNORE_INDEX) -> float:
    """``exp`` of the token-weighted mean :func:`lm_loss` of ``model`` on ``(X, Y)`` (eval mode
    for the duration; the mode is restored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, X.shape[0], batch_size):
            logits = model(X[i:i + batch_size])
            yb = Y[i:i + batch_size]
            n = int((yb != ignore_index).sum())
            if n:
                total += float(lm_loss(logits, yb, ignore_index)) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no target tokens (all are ignore_index)")
    return math.exp(total / count)
