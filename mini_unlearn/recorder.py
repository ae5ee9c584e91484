"""Recorder: the minimal training history Mini-Unlearning needs (DESIGN §2.1).

While training, ``step(lr)`` (after ``backward``, before ``opt.step()``) keeps K checkpoint
segments, each with the running mean of the minibatch gradients and of the weights at which
they were computed (the two describe the same point), and the segment's learning rates.
``finalize`` adds the anchor (trained weights, full-data gradient and loss) and the curvature
(K-FAC per nn.Linear, diagonal GGN elsewhere, or the dense Hessian for tiny models) and
returns a compressed :class:`GradientLog`. The cost of ``step`` never grows with the steps."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _batches
from .curvature import Layout, data_pass, dense_hessian, eigh_psd, kron_blocks
from .log import GradientLog

MAX_LR_RUNS = 4  # learning-rate runs kept per segment (piecewise-constant schedules are exact)


class _Segment:
    """Running sums over one run of consecutive steps."""

    def __init__(self, params: list[torch.Tensor]):
        self.gsum = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.wsum = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.steps = 0
        self.lr_runs: list[list[float]] = []  # [lr, steps] run-length encoded

    def add(self, params: list[torch.Tensor], weights: list[torch.Tensor], lr: float) -> None:
        grads = [p.grad for p in params]
        if grads[0].dtype != torch.float32:
            grads, weights = [g.float() for g in grads], [w.float() for w in weights]
        torch._foreach_add_(self.gsum + self.wsum, grads + weights)  # one fused launch
        self.steps += 1
        if self.lr_runs and self.lr_runs[-1][0] == lr:
            self.lr_runs[-1][1] += 1
        else:
            self.lr_runs.append([lr, 1])

    def merged(self, other: "_Segment") -> "_Segment":
        """A new segment covering self then other (neither is modified)."""
        out = _Segment.__new__(_Segment)
        out.gsum = torch._foreach_add(self.gsum, other.gsum)
        out.wsum = torch._foreach_add(self.wsum, other.wsum)
        out.steps = self.steps + other.steps
        out.lr_runs = []
        for lr, n in self.lr_runs + other.lr_runs:
            if out.lr_runs and out.lr_runs[-1][0] == lr:
                out.lr_runs[-1][1] += n
            else:
                out.lr_runs.append([lr, n])
        return out

    def compact_runs(self) -> list[tuple[float, int]]:
        """At most MAX_LR_RUNS (lr, steps) runs: exact for step schedules, averaged otherwise."""
        runs = [(float(lr), int(n)) for lr, n in self.lr_runs]
        if len(runs) <= MAX_LR_RUNS:
            return runs
        out, per = [], math.ceil(self.steps / MAX_LR_RUNS)
        flat = [lr for lr, n in runs for _ in range(n)]
        for s in range(0, len(flat), per):
            chunk = flat[s:s + per]
            out.append((sum(chunk) / len(chunk), len(chunk)))
        return out


class Recorder:
    """Records a compressed minimal history of training for later unlearning.

    Args:
        model: the model being trained (any nn.Module; Linear layers anywhere in its tree).
        checkpoints: K, the number of trajectory segments kept (0 disables the trajectory mode).
        compression: storage format of the log: "int8", "int4", "bf16" or "fp32".
        curvature: "kfac" (K-FAC per nn.Linear + diagonal GGN elsewhere) or "exact" (dense
            Hessian; d ≤ 4096 only).
        params: names of the parameters to cover (default: all trainable ones).
        total_steps: number of ``step`` calls planned, if known: segments of equal length.
            Unknown: segments start at one step and pairs merge as they exceed 2K.
        grad_includes_weight_decay: True if ``p.grad`` at ``step`` already contains λw
            (weight decay written into the loss), False if the optimizer applies it.
        fisher: "ggn" (softmax cross-entropy GGN, exact per class) or "empirical" (any loss).
        history: "minimal" (Mini-Unlearning) or "all" (every iterate, gradient and batch, for
            DeltaGrad; pass ``indices=`` to ``step``).
        block: quantisation block size.
    """

    def __init__(self, model: nn.Module, checkpoints: int = 10, compression: str = "int8",
                 curvature: str = "kfac", params: list[str] | None = None,
                 total_steps: int | None = None, grad_includes_weight_decay: bool = False,
                 fisher: str = "ggn", history: str = "minimal", block: int = 256):
        if curvature not in ("kfac", "exact"):
            raise ValueError(f"curvature must be 'kfac' or 'exact', got {curvature!r}")
        if fisher not in ("ggn", "empirical"):
            raise ValueError(f"fisher must be 'ggn' or 'empirical', got {fisher!r}")
        if history not in ("minimal", "all"):
            raise ValueError(f"history must be 'minimal' or 'all', got {history!r}")
        if checkpoints < 0:
            raise ValueError("checkpoints must be >= 0")
        self.model, self.K, self.fmt, self.curvature = model, int(checkpoints), compression, curvature
        self.layout = Layout.of(model, params)
        if curvature == "exact" and self.layout.numel > 4096:
            raise ValueError(f"curvature='exact' stores a dense Hessian: only for d <= 4096 "
                             f"parameters, this model has {self.layout.numel}; use 'kfac'")
        self.fisher, self.history, self.block = fisher, history, block
        self.grad_includes_wd = grad_includes_weight_decay
        self._params = self.layout.params(model)
        self._weights = [p.detach() for p in self._params]  # views: optimizers update in place
        self._seg_len = max(1, math.ceil(total_steps / self.K)) if (total_steps and self.K) else 1
        self._fixed_len = bool(total_steps)
        self._closed: list[_Segment] = []
        self._open: _Segment | None = None
        self.steps = 0
        self._all_w: list = []
        self._all_g: list = []
        self._all_batches: list[torch.Tensor] = []
        self._all_lr: list[float] = []

    # ---- during training ----
    def step(self, lr: float, indices: torch.Tensor | None = None) -> None:
        """Record one optimizer step: call after ``loss.backward()`` and before ``opt.step()``."""
        if any(p.grad is None for p in self._params):
            raise RuntimeError("Recorder.step: a covered parameter has no .grad; call it after "
                               "loss.backward() and before opt.step()/zero_grad()")
        self.steps += 1
        if self.history == "all":
            self._record_all(lr, indices)
        if self.K == 0:
            return
        if self._open is None:
            self._open = _Segment(self._params)
        if self._weights[0].data_ptr() != self._params[0].data_ptr():  # model moved (.to())
            self._weights = [p.detach() for p in self._params]
        self._open.add(self._params, self._weights, float(lr))
        if self._open.steps >= self._seg_len:
            self._closed.append(self._open)
            self._open = None
            if not self._fixed_len and len(self._closed) >= 2 * self.K:
                self._closed = [a.merged(b) for a, b in zip(self._closed[::2], self._closed[1::2])]
                self._seg_len *= 2

    def _record_all(self, lr, indices):
        from .ops import compress

        if indices is None:
            raise ValueError("history='all' needs the batch: call step(lr, indices=batch_indices)")
        w = self.layout.flatten(self._params)
        g = self.layout.flatten([p.grad for p in self._params])
        if not self._all_w:
            self._w0 = w.clone()  # the replay's start, kept exact (quantising it costs DeltaGrad)
        self._all_w.append(compress(w, self.fmt, block=self.block))
        self._all_g.append(compress(g, self.fmt, block=self.block))
        self._all_batches.append(torch.as_tensor(indices, dtype=torch.int64).cpu())
        self._all_lr.append(float(lr))

    # ---- after training ----
    def finalize(self, train_data, loss_fn, weight_decay: float = 0.0, *, batch_size: int = 512,
                 progress: bool = True, device=None, exact_checkpoint_grads: bool = False,
                 segment_spectra: int = 0) -> GradientLog:
        """Anchor + curvature pass over ``train_data`` (X, y tensors, Dataset or DataLoader);
        ``loss_fn(outputs, targets)`` is the mean loss. Returns the log.

        ``exact_checkpoint_grads=True`` replaces each segment's mean minibatch gradient by the
        full-data gradient at the segment's mean weights (K extra passes over the data): a
        study option; the segment means are free and measured as good (benchmarks/study_trajectory.py).
        ``segment_spectra=m`` (> 0) also stores each segment's curvature spectra, projected into the
        final K-FAC eigenbasis, from m training samples at the segment's mean weights."""
        model, layout, lam = self.model, self.layout, float(weight_decay)
        n = _batches.count(train_data)
        blocks, diag_names = kron_blocks(model, layout)
        exact = self.curvature == "exact"
        bar = tqdm(total=n, desc="mini_unlearn: anchor + curvature pass", disable=not progress, leave=False)
        try:
            sums = data_pass(model, layout, train_data, loss_fn, curvature=not exact, blocks=blocks,
                             diag_names=diag_names, fisher=self.fisher, batch_size=batch_size,
                             device=device, progress=bar)
        finally:
            bar.close()
        log = GradientLog.for_model(model, params=layout.names, fmt=self.fmt, block=self.block)
        w_a = layout.get(model)
        log.put("anchor/w", w_a, exact=True)
        log.put("anchor/g", sums.grad / n, exact=True)
        meta = log.meta
        meta.update(n_train=n, weight_decay=lam, loss_reduction="mean", anchor_loss=sums.loss / n,
                    curvature=self.curvature, fisher=self.fisher, history=self.history,
                    steps_recorded=self.steps, grad_includes_weight_decay=self.grad_includes_wd)
        if exact:
            log.put("hessian", dense_hessian(model, layout, train_data, loss_fn, batch_size, device) / n,
                    exact=True)
        else:
            meta["kron_blocks"] = [dict(module=b.module, weight=b.weight, bias=b.bias, d_out=b.d_out,
                                        d_in=b.d_in) for b in blocks]
            meta["diag_params"] = list(diag_names)
            for b in blocks:
                for side, m in (("A", sums.A[b.module]), ("G", sums.G[b.module])):
                    s, U = eigh_psd(m / n)
                    log.put(f"kfac/{b.module}/U_{side}", U)
                    log.put(f"kfac/{b.module}/s_{side}", s, exact=True)
            if diag_names:
                log.put("diag/nu", sums.diag / n, exact=True)
        self._finalize_segments(log, w_a, lam, (train_data, loss_fn, batch_size, device)
                                if exact_checkpoint_grads else None)
        if segment_spectra and not exact and log.meta.get("segments"):
            self._segment_spectra(log, blocks, diag_names, w_a, train_data, loss_fn, int(segment_spectra),
                                  batch_size, device)
        if self.history == "all":
            self._finalize_all(log)
        meta["modes"] = ["oneshot", "refresh"] + (["trajectory"] if meta.get("segments") else []) \
            + (["deltagrad"] if self.history == "all" else [])
        log.train_data = train_data  # in memory only: lets unlearn(indices=...) find the rows
        return log

    def _finalize_segments(self, log: GradientLog, w_a: torch.Tensor, lam: float, exact=None) -> None:
        segs = self._closed + ([self._open] if self._open is not None and self._open.steps else [])
        while self.K and len(segs) > self.K:  # thin to at most K
            segs = [a.merged(b) for a, b in zip(segs[::2], segs[1::2])] + (segs[-1:] if len(segs) % 2 else [])
        info = []
        for seg in segs:
            g = self.layout.flatten(seg.gsum) / seg.steps
            w = self.layout.flatten(seg.wsum) / seg.steps
            if self.grad_includes_wd:
                g = g - lam * w  # the mean of (∇L + λw) over the segment, minus λ·mean(w)
            if exact is not None:  # the full-data gradient at the segment's mean weights
                data, loss_fn, bs, dev = exact
                self.layout.set(self.model, w)
                s = data_pass(self.model, self.layout, data, loss_fn, batch_size=bs, device=dev)
                g = s.grad / s.n
                self.layout.set(self.model, w_a)
            log.append_row("ckpt/grad", g)
            log.append_row("ckpt/wdiff", w - w_a)
            info.append({"steps": seg.steps, "lr_runs": seg.compact_runs()})
        log.meta["segments"] = info

    def _segment_spectra(self, log, blocks, diag_names, w_a, data, loss_fn, m, batch_size, device):
        """Curvature at each segment's mean weights on m samples, as spectra in the final basis:
        diag(Uᵀ A_k U) per K-FAC factor (the contraction early in training is stronger than the
        final, confident model's curvature suggests)."""
        n = _batches.count(data)
        sub = _batches.subset(data, torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m]) \
            if m < n else data
        for k in range(log.num_rows("ckpt/wdiff")):
            self.layout.set(self.model, w_a + log.row("ckpt/wdiff", k).to(w_a.device))
            sums = data_pass(self.model, self.layout, sub, loss_fn, curvature=True, blocks=blocks,
                             diag_names=diag_names, fisher=self.fisher, batch_size=batch_size, device=device)
            for b in blocks:
                for side in ("A", "G"):
                    U = log.get(f"kfac/{b.module}/U_{side}").to(sums.A[b.module].device)
                    M = getattr(sums, side)[b.module] / sums.n
                    log.put(f"seg/{k}/{b.module}/s_{side}", ((M @ U) * U).sum(0).clamp_min(0), exact=True)
            if diag_names:
                log.put(f"seg/{k}/diag/nu", sums.diag / sums.n, exact=True)
        self.layout.set(self.model, w_a)
        log.meta["segment_spectra"] = m

    def _finalize_all(self, log: GradientLog) -> None:
        log.put("all/w0", self._w0, exact=True)
        for w, g in zip(self._all_w, self._all_g):
            log.append_row("all/w", w)
            log.append_row("all/g", g)
        log.put("all/batch_sizes", torch.tensor([len(b) for b in self._all_batches]), exact=True)
        log.put("all/batch_indices", torch.cat(self._all_batches), exact=True)
        log.put("all/lr", torch.tensor(self._all_lr), exact=True)
