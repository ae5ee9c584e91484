"""Where each parameter sits in the flat vector, and the [d_out, d_in (+1)] matrix view of a
layer covered by Kronecker factors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Layout:
    """Names, shapes and offsets of the parameters a log covers, in flat-vector order."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    def __post_init__(self) -> None:
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.index = {n: i for i, n in enumerate(self.names)}

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def slice(self, name: str) -> slice:
        i = self.index[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    @classmethod
    def of(cls, model: nn.Module, params: list[str] | None = None) -> "Layout":
        named = dict(model.named_parameters())
        names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
        missing = [n for n in names if n not in named]
        if missing:
            raise KeyError(f"model has no parameter(s) {missing}; choose from {list(named)}")
        return cls(names, [tuple(named[n].shape) for n in names])

    def params(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def get(self, model: nn.Module) -> torch.Tensor:
        return self.flatten(self.params(model))

    @torch.no_grad()
    def set(self, model: nn.Module, vec: torch.Tensor) -> None:
        for p, o, n in zip(self.params(model), self.offsets, self.numels):
            p.copy_(vec[o:o + n].view(p.shape).to(p.dtype))


@dataclass
class KronBlock:
    """A layer whose weight (and bias) are covered by K-FAC factors, seen as a [d_out, d_in (+1)]
    matrix: nn.Linear's weight as is, nn.Conv2d's weight.view(out, in·kh·kw) (KFC), an
    nn.Embedding's weight transposed (``transposed``: stored [d_in, d_out], one-hot inputs).

    ``module`` is the block's key (factor sums, log entries); ``owner`` the module whose hooks
    capture its inputs and outputs (default: ``module``; nn.MultiheadAttention owns two blocks).
    ``a_diag`` / ``g_diag``: that factor is kept as its diagonal (a vector): exact for an
    embedding's one-hot input side, and the memory bound for factors too large to hold densely
    (registry.MAX_FACTOR_BYTES)."""

    module: str
    weight: str
    bias: str | None
    d_out: int
    d_in: int
    owner: str | None = None
    a_diag: bool = False
    g_diag: bool = False
    transposed: bool = False

    @property
    def cols(self) -> int:
        return self.d_in + (self.bias is not None)

    @property
    def hook_module(self) -> str:
        return self.module if self.owner is None else self.owner

    def to_meta(self) -> dict:
        """The fields a log stores (``KronBlock(**meta)`` rebuilds the block; older logs without
        the optional fields read as dense, untransposed, self-owned blocks)."""
        return dict(module=self.module, weight=self.weight, bias=self.bias, d_out=self.d_out,
                    d_in=self.d_in, owner=self.owner, a_diag=self.a_diag, g_diag=self.g_diag,
                    transposed=self.transposed)

    def matrix(self, layout: Layout, vec: torch.Tensor) -> torch.Tensor:
        flat = vec[layout.slice(self.weight)]
        w = flat.view(self.d_in, self.d_out).T if self.transposed else flat.view(self.d_out, self.d_in)
        if self.bias is None:
            return w
        return torch.cat([w, vec[layout.slice(self.bias)].view(self.d_out, 1)], dim=1)

    def scatter(self, layout: Layout, vec: torch.Tensor, m: torch.Tensor) -> None:
        w = m[:, :self.d_in]
        vec[layout.slice(self.weight)] = (w.T if self.transposed else w).reshape(-1)
        if self.bias is not None:
            vec[layout.slice(self.bias)] = m[:, self.d_in]
