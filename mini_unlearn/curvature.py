"""Curvature of the training loss at a point: K-FAC factors per nn.Linear, a diagonal GGN for
every other parameter, or the dense Hessian for tiny models; and the retained preconditioner
P = curvature((n·full − forget)/(n − r)) + λI in its eigenbasis (DESIGN §2.1–2.2)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._batches import batches
from .errors import NonFiniteError


# ---- where each parameter sits in the flat vector ----------------------------------------------

@dataclass
class Layout:
    """Names, shapes and offsets of the parameters a log covers, in flat-vector order."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    def __post_init__(self):
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


# ---- which parameters get Kronecker factors ------------------------------------------------------

@dataclass
class KronBlock:
    """An nn.Linear whose weight (and bias) are covered: its [d_out, d_in (+1)] matrix view."""

    module: str
    weight: str
    bias: str | None
    d_out: int
    d_in: int

    @property
    def cols(self) -> int:
        return self.d_in + (self.bias is not None)

    def matrix(self, layout: Layout, vec: torch.Tensor) -> torch.Tensor:
        w = vec[layout.slice(self.weight)].view(self.d_out, self.d_in)
        if self.bias is None:
            return w
        return torch.cat([w, vec[layout.slice(self.bias)].view(self.d_out, 1)], dim=1)

    def scatter(self, layout: Layout, vec: torch.Tensor, m: torch.Tensor) -> None:
        vec[layout.slice(self.weight)] = m[:, :self.d_in].reshape(-1)
        if self.bias is not None:
            vec[layout.slice(self.bias)] = m[:, self.d_in]


def kron_blocks(model: nn.Module, layout: Layout) -> tuple[list[KronBlock], list[str]]:
    """The Linear layers whose weight the layout covers, and the parameters left over."""
    blocks, covered = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            w = f"{name}.weight" if name else "weight"
            b = f"{name}.bias" if name else "bias"
            if w in layout.index:
                bias = b if (mod.bias is not None and b in layout.index) else None
                blocks.append(KronBlock(name, w, bias, mod.out_features, mod.in_features))
                covered.update({w} | ({bias} if bias else set()))
    return blocks, [n for n in layout.names if n not in covered]


# ---- one pass over data: loss, gradient and curvature sums ---------------------------------------

@dataclass
class PassSums:
    """Sums over the samples of one pass (divide by ``n`` for means)."""

    n: int = 0
    loss: float = 0.0
    grad: torch.Tensor | None = None
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    G: dict[str, torch.Tensor] = field(default_factory=dict)
    diag: torch.Tensor | None = None


def _pseudo_grads(out: torch.Tensor, y: torch.Tensor, fisher: str):
    """Vectors v_c with sum_c v_c v_cᵀ = the output-side curvature of each sample's loss:
    the softmax cross-entropy Hessian diag(p) − ppᵀ (exact GGN, one v per class), or the
    sample's own loss gradient (empirical Fisher)."""
    if fisher == "empirical":
        return None
    p = torch.softmax(out.detach().float(), dim=-1)
    sp = p.sqrt()
    return [(sp[:, c:c + 1] * (F.one_hot(torch.full_like(y, c), p.shape[-1]).float() - p)).to(out.dtype)
            for c in range(p.shape[-1])]


def data_pass(model: nn.Module, layout: Layout, data, loss_fn, *, curvature: bool = False,
              blocks: list[KronBlock] = (), diag_names: list[str] = (), fisher: str = "ggn",
              batch_size: int = 512, device=None, progress=None) -> PassSums:
    """Loss sum, gradient sum (of per-sample losses) and, with ``curvature``, the K-FAC factor
    sums A = Σ ããᵀ, G = Σ δδᵀ per block and the diagonal GGN of ``diag_names``."""
    params = layout.params(model)
    mods = dict(model.named_modules())
    seen: dict[str, tuple] = {}
    hooks = []
    if curvature:
        for b in blocks:
            hooks.append(mods[b.module].register_forward_hook(
                lambda m, i, o, key=b.module: seen.__setitem__(key, (i[0], o))))
    sums = PassSums(grad=torch.zeros(layout.numel, device=device))
    if curvature:
        sums.diag = torch.zeros(sum(layout.numels[layout.index[n]] for n in diag_names), device=device)
    try:
        for x, y in batches(data, batch_size, device):
            out = model(x)
            bsz = x.shape[0]
            loss = loss_fn(out, y) * bsz
            if not torch.isfinite(loss):
                raise NonFiniteError("the loss is NaN/Inf on a batch: check the model and the data")
            grads = torch.autograd.grad(loss, params, retain_graph=curvature, allow_unused=True)
            g = layout.flatten([torch.zeros_like(p) if gi is None else gi for gi, p in zip(grads, params)])
            sums.grad += g
            sums.loss += float(loss.detach())
            sums.n += bsz
            if curvature:
                _accumulate_curvature(sums, model, layout, blocks, diag_names, seen, out, loss, x, y, fisher)
            if progress is not None:
                progress.update(bsz)
    finally:
        for h in hooks:
            h.remove()
    if not torch.isfinite(sums.grad).all():
        raise NonFiniteError("NaN/Inf in the gradient: check the model, the data and the loss")
    return sums


def _accumulate_curvature(sums, model, layout, blocks, diag_names, seen, out, loss, x, y, fisher):
    outs = [seen[b.module][1] for b in blocks]
    vs = _pseudo_grads(out, y, fisher)
    for b in blocks:
        a = seen[b.module][0].detach().reshape(-1, b.d_in).float()
        if b.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, device=a.device)], dim=1)
        sums.A[b.module] = sums.A.get(b.module, 0) + a.T @ a
    if blocks:
        for v in (vs if vs is not None else [None]):
            target, gout = (out, v) if v is not None else (loss, None)
            deltas = torch.autograd.grad(target, outs, grad_outputs=gout, retain_graph=True)
            for b, d in zip(blocks, deltas):
                d = d.reshape(-1, b.d_out).float()
                sums.G[b.module] = sums.G.get(b.module, 0) + d.T @ d
    if diag_names:
        sums.diag += _diag_ggn(model, layout, diag_names, x, y, out, vs)


def _diag_ggn(model, layout, names, x, y, out, vs) -> torch.Tensor:
    """Σ_i Σ_c (J_iᵀ v_ic)² for the parameters ``names`` (per-sample gradients by torch.func)."""
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in named.items() if k not in names}
    own = {k: named[k].detach() for k in names}

    def f(p, xi, vi):
        o = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),))
        return (o.squeeze(0) * vi).sum()

    if vs is None:  # empirical Fisher: v = the sample's loss gradient w.r.t. the outputs
        o = out.detach().requires_grad_(True)
        vs = [torch.autograd.grad(F.cross_entropy(o, y, reduction="sum"), o)[0]]
    total = [torch.zeros_like(own[k], dtype=torch.float32) for k in names]
    for v in vs:
        g = vmap(grad(f), in_dims=(None, 0, 0))(own, x, v.detach())
        for t, k in zip(total, names):
            t += g[k].float().pow(2).sum(0)
    return torch.cat([t.reshape(-1) for t in total])


def dense_hessian(model: nn.Module, layout: Layout, data, loss_fn, batch_size: int = 512,
                  device=None) -> torch.Tensor:
    """Σ_i ∇²ℓ_i over ``data`` w.r.t. the flat parameters (for d ≤ 4096: an exactness oracle)."""
    from torch.func import functional_call

    named = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in named.items() if k not in layout.index}
    w0 = layout.get(model)

    def total_loss(w, xb, yb):
        p = {n: w[layout.slice(n)].view(s).to(named[n].dtype) for n, s in zip(layout.names, layout.shapes)}
        return loss_fn(functional_call(model, {**fixed, **p}, (xb,)), yb) * xb.shape[0]

    from torch.func import hessian

    H = torch.zeros(layout.numel, layout.numel, device=device)
    for xb, yb in batches(data, batch_size, device):
        H += hessian(total_loss)(w0, xb, yb).float()
    return H


# ---- the retained preconditioner in its eigenbasis -----------------------------------------------

@dataclass
class EigenBlock:
    """One block of P: a [rows, cols] view of the flat vector, rotated by U_out (left) and
    U_in (right; None for vector blocks), with curvature nu_ij = s_out[i] * s_in[j]."""

    gather: object  # vec -> [rows, cols]
    scatter: object  # (vec, [rows, cols]) -> None
    U_out: torch.Tensor | None
    s_out: torch.Tensor
    U_in: torch.Tensor | None
    s_in: torch.Tensor

    def to_eig(self, m: torch.Tensor) -> torch.Tensor:
        if self.U_out is not None:
            m = self.U_out.T @ m
        if self.U_in is not None:
            m = m @ self.U_in
        return m.contiguous()

    def from_eig(self, m: torch.Tensor) -> torch.Tensor:
        if self.U_out is not None:
            m = self.U_out @ m
        if self.U_in is not None:
            m = m @ self.U_in.T
        return m

    def nu(self) -> torch.Tensor:
        return self.s_out[:, None] * self.s_in[None, :]


def eigh_psd(m: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix. float32 is the
    default: 3-4x faster than float64 and the same unlearning result (the small eigenvalues it
    gets wrong sit under λ); pass float64 for an oracle."""
    s, U = torch.linalg.eigh(((m + m.T) / 2).to(dtype))
    return s.clamp_min(0).float(), U.float()


class Preconditioner:
    """P = curvature of the retained loss + λI, block-diagonal, each block in its eigenbasis."""

    def __init__(self, blocks: list[EigenBlock], lam: float, numel: int):
        self.blocks, self.lam, self.numel = blocks, lam, numel

    def rotate(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return [b.to_eig(b.gather(vec)) for b in self.blocks]

    def unrotate(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.numel, device=parts[0].device)
        for b, m in zip(self.blocks, parts):
            b.scatter(out, b.from_eig(m))
        return out

    def solve(self, vec: torch.Tensor) -> torch.Tensor:
        """P⁻¹ vec."""
        return self.unrotate([m / (b.nu() + self.lam) for b, m in zip(self.blocks, self.rotate(vec))])
