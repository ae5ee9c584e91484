"""One pass over data: loss sum, gradient sum and (optionally) the curvature sums, with the
normalisation layers in the mode training used and their running statistics left untouched."""
from __future__ import annotations

import math

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .._batches import batches, count as count_samples
from ..errors import NonFiniteError, UnsupportedTrainingError
from .layout import KronBlock, Layout
from .norm import uses_batch_stats
from .outputs import pseudo_grads
from .registry import diag_plan, rule_for

_STATEFUL = (_BatchNorm, _InstanceNorm)


@dataclass
class PassSums:
    """Sums over the samples of one pass (divide by ``n`` for means)."""

    n: int = 0
    loss: float = 0.0
    grad: torch.Tensor | None = None
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    G: dict[str, torch.Tensor] = field(default_factory=dict)
    diag: torch.Tensor | None = None
    #: per Kronecker block with a trace calibration: Σ over the sampled samples (and output-side
    #: vectors) of [exact per-sample curvature trace, the Kronecker model's, count]
    #: (``position_traces``)
    sq: dict[str, torch.Tensor] = field(default_factory=dict)

    def __add__(self, other: "PassSums") -> "PassSums":
        """The sums over the union of two disjoint passes' data (every field is additive)."""
        def add(a, b):
            return b if a is None else a if b is None else a + b

        def merge(x: dict, y: dict) -> dict:
            return {k: add(x.get(k), y.get(k)) for k in dict.fromkeys([*x, *y])}

        return PassSums(self.n + other.n, self.loss + other.loss, add(self.grad, other.grad),
                        merge(self.A, other.A), merge(self.G, other.G), add(self.diag, other.diag),
                        merge(self.sq, other.sq))


TRACE_SAMPLES = 128  # samples per pass (at least) on which the trace calibration is measured


def trace_scale(exact: float, model: float) -> float:
    """The calibration c = exact / model of a block's G from ``position_traces`` (sums or means;
    conv2d.py, "Trace calibration"); 1 where either is zero."""
    return exact / model if model > 0 and exact > 0 else 1.0


def trace_scales(meta: dict) -> dict[str, float]:
    """Each calibrated block's c from a log's ``meta["kfac_traces"]`` (finalize's means); empty
    for logs finalized before the calibration (their factors are used as they are)."""
    return {k: trace_scale(ex, mo) for k, (ex, mo) in (meta.get("kfac_traces") or {}).items()}


def norm_train_mode(model: nn.Module) -> bool | None:
    """True if the model's BatchNorm/InstanceNorm layers are in train mode (batch statistics),
    False if in eval mode, None if it has none (record it with a log to replay passes alike)."""
    modes = {m.training for m in model.modules() if isinstance(m, _STATEFUL)}
    return None if not modes else (True in modes)


@contextmanager
def pass_mode(model: nn.Module, train_mode: bool | None = None) -> Iterator[None]:
    """Run a data pass with BatchNorm/InstanceNorm layers in train mode (batch statistics,
    ``train_mode=True``), eval mode (running statistics, False) or as they are (None), never
    writing their running statistics: tracking is switched off for the pass (no in-place
    buffer update, so torch.func transforms work) and every buffer is restored afterwards.
    Other layers (dropout, ...) keep the caller's mode."""
    saved = []
    for m in model.modules():
        if isinstance(m, _STATEFUL):
            bufs = {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}
            saved.append((m, m.training, m.track_running_stats, bufs))
    try:
        for m, _, _, _ in saved:
            if train_mode is not None:
                m.train(bool(train_mode))
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
                m.track_running_stats = False  # batch statistics, buffers neither read nor written
        yield
    finally:
        with torch.no_grad():
            for m, training, track, bufs in saved:
                m.train(training)
                m.track_running_stats = track
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)


@torch.no_grad()
def recalibrate_norm_stats(model: nn.Module, data, batch_size: int = 512, device=None) -> int:
    """Recompute every BatchNorm's running statistics on ``data`` by a forward-only pass in
    train mode, as the cumulative average over its batches (momentum=None), e.g. after
    unlearning, so that eval-mode predictions use statistics of the retained data. Each layer's
    momentum and every module's mode are restored afterwards (on error, the old statistics too).
    Returns the number of layers recalibrated.

    Without retained data, keep the original model's statistics: they include the forget set,
    but the weights moved little (the unlearning update is a small correction), and the
    statistics are means over many samples, so the forget set's share is about r/n of them."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
             for m in bns]
    ok = False
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x, _ in batches(data, batch_size, device):
            model(x)
        ok = True
    finally:
        for m, mom, bufs in saved:
            m.momentum = mom
            if not ok:
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)
        for m, t in modes:
            m.training = t
    return len(bns)


PASS_BATCH_SIZE = 512  # data passes over models without batch-statistics layers


def pass_batch_size(model: nn.Module, train_mode: bool | None, recorded: int | None,
                    batch_size: int | None = None) -> int:
    """The batch size of a data pass: ``batch_size`` when given; else, for a model whose
    BatchNorm/InstanceNorm layers were trained in train mode (batch statistics), the training
    batch size the Recorder saw (``recorded``), so that every pass normalises over batches of
    the size training's gradients were computed on; else ``PASS_BATCH_SIZE``."""
    if batch_size is not None:
        bs = int(batch_size)
    elif train_mode and recorded and norm_train_mode(model) is not None:
        bs = int(recorded)
    else:
        bs = PASS_BATCH_SIZE
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return bs


def data_pass(model: nn.Module, layout: Layout, data, loss_fn, *, curvature: bool = False,
              blocks: list[KronBlock] = (), diag_names: list[str] = (), fisher: str = "ggn",
              batch_size: int = 512, device=None, progress=None, train_mode: bool | None = None,
              mc_samples: int = 1, seed: int = 0, traces: bool = False) -> PassSums:
    """Loss sum, gradient sum (of per-sample losses) and, with ``curvature``, the K-FAC factor
    sums A = Σ_i (1/T) Σ_t ããᵀ, G = Σ_i Σ_t δδᵀ per block and the diagonal curvature of
    ``diag_names`` (closed-form per-sample gradients for normalisation layers and biases, a
    per-sample vmap for anything else, eval mode only).

    ``fisher``: "ggn" (exact softmax cross-entropy GGN, one backward per class), "mc"
    (Monte-Carlo Fisher, ``mc_samples`` backwards, draws seeded by ``seed`` and each sample's
    content) or "empirical" (the loss's own gradient; any loss). ``train_mode``: normalisation
    layers in train mode (True: batch statistics, as training computed its gradients), eval
    mode (False) or as they are (None); their running statistics are never modified. In train
    mode the statistics are the pass's batch's, so ``batch_size`` should be training's batch size
    for the pass to see what training saw (and small batches are also faster on CPU caches).
    The sums are raw (additive over disjoint data). ``traces=True`` (finalize): blocks whose
    rule has a trace calibration (Conv2d) also get ``sq``, ``position_traces`` summed over the
    first ⌈``TRACE_SAMPLES`` / batches⌉ samples of every batch (see conv2d.py)."""
    with pass_mode(model, train_mode):
        return _pass(model, layout, data, loss_fn, curvature, list(blocks), list(diag_names), fisher,
                     batch_size, device, progress, mc_samples, seed, traces)


def _pass(model, layout, data, loss_fn, curvature, blocks, diag_names, fisher, batch_size, device,
          progress, mc_samples, seed, traces=False) -> PassSums:
    params = layout.params(model)
    mods = dict(model.named_modules())
    cheap, rest = diag_plan(model, layout, diag_names) if curvature else ({}, [])
    # trace calibration: the first `per_batch` samples of every batch, TRACE_SAMPLES at least
    per_batch = -(-TRACE_SAMPLES // max(1, -(-count_samples(data) // batch_size))) if traces else 0
    if rest and any(uses_batch_stats(m) for m in model.modules()):
        raise UnsupportedTrainingError(
            f"parameters {rest} have no closed-form curvature rule, and their per-sample fallback "
            f"cannot run while BatchNorm uses batch statistics (train mode couples the samples). "
            f"Leave them out of the recorded parameters (Recorder(params=[...])), register a rule "
            f"for their layer type (mini_unlearn.curvature.registry), or record in eval mode")
    blocks_rules = []
    for b in blocks:
        owner = b.hook_module
        r = rule_for(mods[owner]) if owner in mods else None
        if r is None:
            raise UnsupportedTrainingError(f"no Kronecker rule for module {owner!r} "
                                           f"({type(mods.get(owner)).__name__})")
        blocks_rules.append((b, r))
    # what each hooked module records: (input, output) per call, keyed by block / module name
    owners = list(dict.fromkeys([b.hook_module for b in blocks] + list(cheap)))
    keys = list(dict.fromkeys([b.module for b in blocks] + list(cheap)))
    seen: dict[str, list] = {k: [] for k in keys}
    hooks = []

    def recorder(owner):
        def record(part, xin, o):
            key = owner if part is None else (f"{owner}.{part}" if owner else part)
            if key in seen:
                seen[key].append((xin, o))
        return record

    if curvature:
        for owner in owners:
            hooks += rule_for(mods[owner]).capture(mods[owner], recorder(owner))
    dpos = {}
    if curvature:
        off = 0
        for nme in diag_names:
            k = layout.numels[layout.index[nme]]
            dpos[nme] = slice(off, off + k)
            off += k
    sums = PassSums(grad=torch.zeros(layout.numel, device=device))
    if curvature:
        sums.diag = torch.zeros(sum(layout.numels[layout.index[n]] for n in diag_names), device=device)
    # Loss sum and a non-finite flag stay on the device: one host sync per pass, not per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=sums.grad.device)
    try:
        for x, y in batches(data, batch_size, device):
            for v in seen.values():
                v.clear()
            out = model(x)
            bsz = x.shape[0]
            loss = loss_fn(out, y) * bsz
            outs = [(key, j, o) for key in keys for j, (_, o) in enumerate(seen[key])
                    if torch.is_tensor(o) and o.requires_grad] if curvature else []
            for key, _, o in outs:
                if o.dim() == 0 or o.shape[0] != bsz:
                    raise UnsupportedTrainingError(
                        f"the output of {key!r} has shape {tuple(o.shape)}, not [batch={bsz}, ...]: "
                        f"its gradient mixes the samples of the batch (e.g. a layer applied to a "
                        f"tensor shared by the batch and broadcast, or a sequence-first layout), so "
                        f"per-sample curvature cannot be read from it. Apply the layer per sample "
                        f"(e.g. a position embedding to [B, T] indices) or leave its parameters out")
            extra = [o for _, _, o in outs] + ([out] if curvature else [])
            grads = torch.autograd.grad(loss, params + extra, retain_graph=curvature and fisher != "empirical",
                                        allow_unused=True)
            g = layout.flatten([torch.zeros_like(p) if gi is None else gi for gi, p in zip(grads, params)])
            sums.grad += g
            loss_sum += loss.detach().double()
            sums.n += bsz
            if curvature:
                g_out = grads[-1] if grads[-1] is not None else torch.zeros_like(out)
                vs = pseudo_grads(out, y, g_out, fisher, mc_samples=mc_samples, seed=seed, x=x)
                first = list(grads[len(params):-1])
                _accumulate(sums, mods, blocks_rules, cheap, dpos, seen, outs, out, vs, first, fisher, per_batch)
                if rest:
                    sums.diag[torch.cat([torch.arange(dpos[n].start, dpos[n].stop) for n in rest])
                              .to(sums.diag.device)] += _diag_vmap(model, rest, x, vs)
            if progress is not None:
                progress.update(bsz)
    finally:
        for h in hooks:
            h.remove()
        for v in seen.values():
            v.clear()
    sums.loss = float(loss_sum)
    silent = [b.module for b in blocks if curvature and sums.n and b.module not in sums.A]
    if silent:
        raise UnsupportedTrainingError(
            f"the Kronecker blocks {silent} saw no call during the pass: their module was never run "
            f"through its own forward (a parent applying its weights functionally, or an unused "
            f"layer), so their curvature is unknown. Give the parent a rule (curvature/registry.py) "
            f"or leave these parameters out of the recorded ones (Recorder(params=[...]))")
    if not math.isfinite(sums.loss):
        raise NonFiniteError("the loss is NaN/Inf on some batch of this pass: check the model and the data")
    if not torch.isfinite(sums.grad).all():
        raise NonFiniteError("NaN/Inf in the gradient: check the model, the data and the loss")
    for side in ("A", "G"):
        for key, m in getattr(sums, side).items():
            if not torch.isfinite(m).all():
                raise NonFiniteError(f"NaN/Inf in the K-FAC factor {side} of layer {key!r}: check that "
                                     f"layer's inputs/outputs (overflow in low precision?)")
    if sums.diag is not None and not torch.isfinite(sums.diag).all():
        bad = [n for n, s in dpos.items() if not torch.isfinite(sums.diag[s]).all()]
        raise NonFiniteError(f"NaN/Inf in the diagonal curvature of {bad}")
    return sums


def _detached(t: torch.Tensor) -> torch.Tensor:
    """float32 copy of a floating input; integer inputs (token ids) as they are."""
    t = t.detach()
    return t.float() if t.is_floating_point() else t


def _accumulate(sums, mods, blocks_rules, cheap, dpos, seen, outs, out, vs, first, fisher, per_batch=0) -> None:
    """Add one batch's factor sums and cheap diagonals."""
    for b, r in blocks_rules:
        m = mods[b.hook_module]
        for xin, _ in seen[b.module]:
            x = _detached(xin)
            a = r.a_diag_factor(m, x, b.bias is not None) if b.a_diag else r.a_factor(m, x, b.bias is not None)
            _add_into(sums.A, b.module, a)
    if not outs:
        return
    deltas_per_v = [first] if fisher == "empirical" else (
        torch.autograd.grad(out, [o for _, _, o in outs], grad_outputs=v, retain_graph=True, allow_unused=True)
        for v in vs)
    index = {(key, j): i for i, (key, j, _) in enumerate(outs)}
    prep = {(key, j): rule_for(mods[key]).prepare(mods[key], _detached(xin), o.detach().float())
            for key in cheap for j, (xin, o) in enumerate(seen[key])}  # once per batch
    for deltas in deltas_per_v:
        for b, r in blocks_rules:
            m = mods[b.hook_module]
            for j in range(len(seen[b.module])):
                i = index.get((b.module, j))
                if i is None or deltas[i] is None:
                    continue
                dy = deltas[i].detach().float()
                gf = r.g_diag_factor(m, dy) if b.g_diag else r.g_factor(m, dy)
                _add_into(sums.G, b.module, gf)
                if per_batch and r.position_traces is not None:
                    xin = _detached(seen[b.module][j][0])
                    tr = r.position_traces(m, xin[:per_batch], dy[:per_batch], b.bias is not None)
                    _add_into(sums.sq, b.module, tr)
        # per-sample gradients summed over every use of a parameter (calls, tied modules), then squared
        tot: dict[str, torch.Tensor] = {}
        for key, attrs in cheap.items():
            m = mods[key]
            r = rule_for(m)
            names = list(attrs)
            for j in range(len(seen[key])):
                i = index.get((key, j))
                if i is None or deltas[i] is None:
                    continue
                per = r.per_sample(m, prep[(key, j)], deltas[i].detach().float(), names, attrs)
                for n, t in per.items():
                    tot[n] = tot[n] + t if n in tot else t
        for n, t in tot.items():
            sums.diag[dpos[n]] += t.pow(2).sum(0).reshape(-1)
    for b, _ in blocks_rules:  # blocks never reached by a backward still get a (zero) G
        if b.module not in sums.G:
            shape = (b.d_out,) if b.g_diag else (b.d_out, b.d_out)
            sums.G[b.module] = torch.zeros(shape, device=sums.grad.device)


def _add_into(acc: dict, key: str, t: torch.Tensor) -> None:
    """acc[key] += t in place (the first batch's own tensor becomes the sum: no new factor-sized
    allocation per batch)."""
    if key in acc:
        acc[key].add_(t)
    else:
        acc[key] = t.clone() if t._base is not None else t


def _diag_vmap(model: nn.Module, names: list[str], x: torch.Tensor, vs) -> torch.Tensor:
    """Σ_i Σ_v (J_iᵀ v_i)² for the parameters ``names`` by per-sample gradients (torch.func):
    the fallback for layers without a closed-form rule (eval mode only; costly)."""
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in named.items() if k not in names}
    own = {k: named[k].detach() for k in names}

    def f(p, xi, vi):
        o = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),))
        return (o.squeeze(0) * vi).sum()

    total = [torch.zeros_like(own[k], dtype=torch.float32) for k in names]
    for v in vs:
        g = vmap(grad(f), in_dims=(None, 0, 0))(own, x, v.detach())
        for t, k in zip(total, names):
            t += g[k].float().pow(2).sum(0)
    return torch.cat([t.reshape(-1) for t in total])


def _flat_forward(model: nn.Module, layout: Layout):
    """``forward(w, x)``: the model's output with its recorded parameters taken from the flat
    vector ``w`` (the others as they are), for torch.func transforms."""
    from torch.func import functional_call

    named = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in named.items() if k not in layout.index}

    def forward(w: torch.Tensor, x):
        p = {n: w[layout.slice(n)].view(s).to(named[n].dtype) for n, s in zip(layout.names, layout.shapes)}
        return functional_call(model, {**fixed, **p}, (x,))

    return forward


def dense_hessian(model: nn.Module, layout: Layout, data, loss_fn, batch_size: int = 512,
                  device=None, train_mode: bool | None = None) -> torch.Tensor:
    """Σ_i ∇²ℓ_i over ``data`` w.r.t. the flat parameters (for d ≤ 4096: an exactness oracle).
    Normalisation layers as in :func:`data_pass` (``train_mode``; buffers untouched). Through
    train-mode BatchNorm it inherits PyTorch's batch-norm double backward, which was measured
    asymmetric here (non-zero d²L/dγ d(input shift), float64 too): an indicative oracle only."""
    from torch.func import hessian

    forward = _flat_forward(model, layout)
    w0 = layout.get(model)

    def total_loss(w, xb, yb):
        return loss_fn(forward(w, xb), yb) * xb.shape[0]

    H = torch.zeros(layout.numel, layout.numel, device=device)
    with pass_mode(model, train_mode):
        for xb, yb in batches(data, batch_size, device):
            H += hessian(total_loss)(w0, xb, yb).float()
    return H


def ggn_quadratic(model: nn.Module, layout: Layout, data, loss_fn, directions: list[torch.Tensor], *,
                  batch_size: int = 512, device=None, train_mode: bool | None = None,
                  max_samples: int | None = None) -> tuple[torch.Tensor, int]:
    """The exact Gauss-Newton curvature of the mean loss along each flat direction v, the mean over
    the samples of ``data`` of (J v)ᵀ ∇²_f ℓ (J v) (J: the outputs' Jacobian at the model's
    current parameters), by forward-mode Jacobian products (all directions of a batch in one
    vmapped pass); any loss
    (its Hessian in the outputs comes from autograd), over the first ``max_samples`` samples
    (all by default). Normalisation layers as in :func:`data_pass`
    (``train_mode``; buffers untouched). Returns the means (float32, [len(directions)]) and the
    number of samples they are over."""
    from torch.func import grad, jvp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forward = _flat_forward(model, layout)
    w0 = layout.get(model).detach()
    V = torch.stack([v.to(w0) for v in directions])
    out = torch.zeros(V.shape[0], dtype=torch.float64, device=w0.device)
    seen = 0
    # forward-mode AD: scaled_dot_product_attention's fused CPU/GPU kernels have no forward
    # derivative, its math form does
    with pass_mode(model, train_mode), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        for xb, yb in batches(data, batch_size, device):
            if max_samples is not None:
                xb, yb = xb[:max_samples - seen], yb[:max_samples - seen]

            def total(o, yb=yb, b=xb.shape[0]):
                return loss_fn(o, yb) * b

            # all directions in one batched forward-mode pass (the primal runs once)
            o, JV = vmap(lambda v, xb=xb: jvp(lambda w: forward(w, xb), (w0,), (v,)), out_dims=(None, 0))(V)
            HJV = vmap(lambda t: jvp(grad(total), (o,), (t,))[1])(JV)
            out += (HJV.double() * JV.double()).reshape(V.shape[0], -1).sum(1)
            seen += xb.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    return (out / max(seen, 1)).float(), seen
