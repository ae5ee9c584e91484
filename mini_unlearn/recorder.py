"""Recorder: the minimal training history Mini-Unlearning needs (docs/math.md).

While training, ``step(lr)`` (after ``backward``, before ``opt.step()``) keeps K checkpoint
segments, each with the running mean of the minibatch gradients and of the weights at which
they were computed (the two describe the same point), and the segment's learning rates.
``finalize`` adds the anchor (trained weights, full-data gradient and loss) and the curvature
(K-FAC per nn.Linear, diagonal GGN elsewhere, or the dense Hessian for tiny models) and
returns a compressed :class:`GradientLog`. The cost of ``step`` never grows with the steps."""
from __future__ import annotations

import math
import weakref
import os
import tempfile

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _batches
from .curvature import (Layout, auto_fisher, data_pass, dense_hessian, eigh_psd, kron_blocks,
                        pass_batch_size, trace_scales)
from .errors import UnsupportedTrainingError
from .log import GradientLog
from .ops import Compressed, compress, decompress

MAX_LR_RUNS = 4  # step-rule runs kept per segment (piecewise-constant schedules are exact)


def _compact(runs: list[list], total: int, limit: int = MAX_LR_RUNS) -> list[list]:
    """At most ``limit`` runs ``[*values, steps]``: exact for step schedules; otherwise the steps
    are cut into ``limit`` chunks whose numeric values are averaged (booleans kept)."""
    if len(runs) <= limit:
        return [list(r) for r in runs]
    flat = [r[:-1] for r in runs for _ in range(int(r[-1]))]
    per = math.ceil(total / limit)
    out = []
    for s in range(0, len(flat), per):
        chunk = flat[s:s + per]
        vals = [v if isinstance(v, bool) else sum(c[i] for c in chunk) / len(chunk)
                for i, v in enumerate(chunk[0])]
        out.append(vals + [len(chunk)])
    return out


def _add_run(runs: list[list], values: list, count: int = 1) -> None:
    if runs and runs[-1][:-1] == values:
        runs[-1][-1] += count
    else:
        runs.append(list(values) + [count])


class _Segment:
    """Running sums over one run of consecutive steps (on the model's device while open). Each
    sum is one flat fp32 buffer (the log's flat layout) with per-parameter views, so closing the
    segment compresses it in place with no full-size temporary."""

    def __init__(self, params: list[torch.Tensor], groups: int, precond: bool,
                 span: tuple[int, int] | None = None):
        d = sum(p.numel() for p in params)
        lo, hi = (0, d) if span is None else span
        dev = params[0].device
        # the parts of the parameters inside this rank's slice [lo, hi) of the flat vector (all of
        # them on one process): (parameter index, start, stop within it, start in the buffer)
        self.pieces: list[tuple[int, int, int, int]] = []
        o = 0
        for i, p in enumerate(params):
            a, b = max(lo, o), min(hi, o + p.numel())
            if a < b:
                self.pieces.append((i, a - o, b - o, a - lo))
            o += p.numel()
        self.whole = span is None
        self.flat = {k: torch.zeros(hi - lo, device=dev) for k in (("grad", "w", "d") if precond else ("grad", "w"))}
        self.views = {k: list(self._views(v, params)) for k, v in self.flat.items()}
        self.steps = 0
        self.runs: list[list[list]] = [[] for _ in range(groups)]  # per group: [*rule, steps]

    def _views(self, flat: torch.Tensor, params):
        for i, a, b, at in self.pieces:
            v = flat[at:at + b - a]
            yield v.view(params[i].shape) if self.whole else v

    def parts(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces of per-parameter ``tensors`` that this segment sums (views where possible)."""
        if self.whole:
            return list(tensors)
        return [tensors[i].reshape(-1)[a:b] for i, a, b, _ in self.pieces]

    @property
    def dsum(self):
        return self.views.get("d")

    def add(self, grads: list[torch.Tensor], weights: list[torch.Tensor], rules: list[list]) -> None:
        if grads[0].dtype != torch.float32:
            grads, weights = [g.float() for g in grads], [w.float() for w in weights]
        grads, weights = self.parts(grads), self.parts(weights)
        if grads:  # (a rank whose slice is empty holds nothing)
            torch._foreach_add_(self.views["grad"] + self.views["w"], grads + weights)  # one fused launch
        self.steps += 1
        for runs, rule in zip(self.runs, rules):
            _add_run(runs, rule)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


class _Closed:
    """A closed segment: its mean gradient, mean weights (and mean Adam preconditioner),
    compressed at once and kept off the model's device (host memory, or a spill file)."""

    def __init__(self, vecs: dict[str, Compressed], steps: int, runs: list[list[list]], spill: str | None):
        self.steps, self.runs, self._path, self._vecs = steps, runs, None, None
        if spill is None:
            self._vecs = {k: _to_cpu(c) for k, c in vecs.items()}
        else:
            from safetensors.torch import save_file

            fd, self._path = tempfile.mkstemp(suffix=".safetensors", dir=spill)
            os.close(fd)
            flat = {}
            for k, c in vecs.items():
                flat[f"{k}.data"] = c.data.contiguous().cpu()
                if c.scales is not None:
                    flat[f"{k}.scales"] = c.scales.contiguous().cpu()
            save_file(flat, self._path, metadata={k: f"{c.fmt},{c.numel},{c.block}" for k, c in vecs.items()})

    def vecs(self) -> dict[str, Compressed]:
        if self._vecs is not None:
            return self._vecs
        from safetensors import safe_open

        out = {}
        with safe_open(self._path, framework="pt") as f:
            meta = f.metadata()
            for k, spec in meta.items():
                fmt, numel, block = spec.split(",")
                scales = f.get_tensor(f"{k}.scales") if f"{k}.scales" in f.keys() else None
                out[k] = Compressed(fmt, f.get_tensor(f"{k}.data"), scales, int(numel), int(block))
        return out

    def drop(self) -> None:
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)

    def host_nbytes(self) -> int:
        if self._vecs is None:
            return 0
        return sum(c.data.numel() * c.data.element_size()
                   + (0 if c.scales is None else c.scales.numel() * c.scales.element_size())
                   for c in self._vecs.values())


def _to_cpu(c: Compressed) -> Compressed:
    # once per closed segment (never per step): the compressed segment leaves the device
    return Compressed(c.fmt, c.data.to("cpu"), None if c.scales is None else c.scales.to("cpu"), c.numel, c.block)


class Recorder:
    """Records a compressed minimal history of training for later unlearning.

    Two ways to record:

    * ``rec.attach(optimizer)`` (recommended): an optimizer step hook records every real step
      with the optimizer's own settings (SGD with momentum/dampening/Nesterov/weight decay, Adam,
      AdamW; any LR scheduler; gradient accumulation and clipping — the hook sees the gradient
      the step uses; AMP with ``GradScaler`` — unscaled gradients, skipped steps unrecorded).
      Other optimizers raise :class:`~mini_unlearn.errors.UnsupportedTrainingError`.
    * ``rec.step(lr)`` by hand after ``backward`` and before ``opt.step()``: plain SGD only.

    Memory: the open segment's running sums (2× the covered parameters' fp32 bytes, 3× under
    Adam) stay on the model's device; a segment is compressed when it closes and moved to host
    memory, or written to ``spill_dir``, so the device holds at most ~3× the model's fp32 bytes
    whatever K and ``total_steps`` (``peak_device_bytes`` measures it).

    Args:
        model: the model being trained (any nn.Module).
        checkpoints: K, the number of trajectory segments kept (0 disables the trajectory mode).
        compression: storage format of the log: "int8", "int4", "bf16" or "fp32".
        curvature: "kfac" (K-FAC per supported layer + diagonal elsewhere) or "exact" (dense
            Hessian; d ≤ 4096 only).
        params: names of the parameters to cover (default: all trainable ones).
        total_steps: number of optimizer steps planned, if known: segments of equal length.
            Unknown: segments start at one step and pairs merge as they exceed 2K.
        grad_includes_weight_decay: True if ``p.grad`` at ``step`` already contains λw
            (weight decay written into the loss), False if the optimizer applies it.
        fisher: the output-side curvature: "ggn" (softmax cross-entropy GGN, exact: one backward
            per class), "mc" (Monte-Carlo Fisher: ``mc_samples`` labels drawn from the model's
            own softmax, one backward each; for many classes and for the ≤ 2× epoch budget of
            convolutional nets), "empirical" (any loss), or "auto" (default: "ggn" up to 64
            classes on models without convolutions, "mc" otherwise;
            :func:`mini_unlearn.curvature.auto_fisher`).
        mc_samples: draws per sample for fisher="mc".
        history: "minimal" (Mini-Unlearning) or "all" (every iterate, gradient and batch, for
            DeltaGrad; pass ``indices=`` to ``step``).
        block: quantisation block size.
        spill_dir: write closed segments to this directory instead of keeping them in memory.
        group: the torch.distributed process group (default: the world group when one is
            initialised). Inside a torchrun job of N ≥ 2 ranks every rank records only its
            contiguous, block-aligned slice of each flat history vector (1/N of the memory); the
            optimizer hook and ``step`` add no communication (under DDP the gradients are
            already identical on every rank). ``finalize`` is then a collective and returns this
            rank's shard of the log (docs/distributed.md).
        max_factor_bytes: a K-FAC factor larger than this as a dense float32 matrix is kept as
            its diagonal (default ``curvature.MAX_FACTOR_BYTES`` = 64 MiB: a language model's
            [V, V] output factor for V > 4096; docs/math.md, "Memory bound").
    """

    def __init__(self, model: nn.Module, checkpoints: int = 10, compression: str = "int8",
                 curvature: str = "kfac", params: list[str] | None = None,
                 total_steps: int | None = None, grad_includes_weight_decay: bool = False,
                 fisher: str = "auto", history: str = "minimal", block: int = 256, mc_samples: int = 1,
                 spill_dir: str | os.PathLike | None = None, group=None,
                 max_factor_bytes: int | None = None):
        if curvature not in ("kfac", "exact"):
            raise ValueError(f"curvature must be 'kfac' or 'exact', got {curvature!r}")
        if fisher not in ("auto", "ggn", "mc", "empirical"):
            raise ValueError(f"fisher must be 'auto', 'ggn', 'mc' or 'empirical', got {fisher!r}")
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if history not in ("minimal", "all"):
            raise ValueError(f"history must be 'minimal' or 'all', got {history!r}")
        if checkpoints < 0:
            raise ValueError("checkpoints must be >= 0")
        if total_steps is not None and int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1 (or None when unknown), got {total_steps}")
        from .distributed import unwrap
        model = unwrap(model)  # Recorder(ddp_model): the inner module's parameters and names
        self.model, self.K, self.fmt, self.curvature = model, int(checkpoints), compression, curvature
        self.layout = Layout.of(model, params)
        if curvature == "exact" and self.layout.numel > 4096:
            raise ValueError(f"curvature='exact' stores a dense Hessian: only for d <= 4096 "
                             f"parameters, this model has {self.layout.numel}; use 'kfac'")
        self.fisher, self.history, self.block, self.mc_samples = fisher, history, block, int(mc_samples)
        self.grad_includes_wd = grad_includes_weight_decay
        self.max_factor_bytes = None if max_factor_bytes is None else int(max_factor_bytes)
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        if self.spill_dir is not None:
            os.makedirs(self.spill_dir, exist_ok=True)
        self._params = self.layout.params(model)
        from .distributed import communicator
        self.comm = communicator(group)
        #: this rank's slice [lo, hi) of every flat history vector (None: the whole vector)
        self.span = None if self.comm is None else self.comm.slice(self.layout.numel, block)
        self._weights = [p.detach() for p in self._params]  # views: optimizers update in place
        self._seg_len = max(1, math.ceil(total_steps / self.K)) if (total_steps and self.K) else 1
        self._fixed_len = bool(total_steps)
        self._closed: list[_Closed] = []
        self._open: _Segment | None = None
        self.steps = 0
        self.train_mode = False  # was the model in train mode at the recorded steps
        self._optim = None  # (optimizer, adapter, group of each covered param, hook handles)
        self._group_steps: list[int] = []
        self._model_bytes = sum(p.numel() * 4 for p in self._params)
        self.peak_device_bytes = 0
        self._all_w: list = []
        self._all_g: list = []
        self._all_batches: list[torch.Tensor] = []
        self._all_lr: list[float] = []
        # The minibatch size, read from the leading dimension of the model's input (no sync: a
        # shape is host-side): a retained repair (``unlearn(retain=...)``) steps at this size.
        self._last_batch = 0
        self._batch_max = 0
        # A closure over a weak reference: copy.deepcopy(model) copies hooks, and must not copy
        # the Recorder with them. Removed by finalize() and detach().
        ref = weakref.ref(self)

        def see_batch(module, args):
            rec = ref()
            if rec is not None and args and torch.is_tensor(args[0]) and args[0].dim() > 0:
                rec._last_batch = int(args[0].shape[0])

        self._fwd_hook = model.register_forward_pre_hook(see_batch)

    # ---- during training ----
    def attach(self, optimizer: torch.optim.Optimizer) -> "Recorder":
        """Record every step of ``optimizer`` through its step hooks (see the class docstring).
        Raises UnsupportedTrainingError for unsupported optimizers or settings, or when a covered
        parameter is not optimised by it. Returns ``self``; ``detach()`` removes the hooks."""
        from .optimizers import adapter_for

        if self._optim is not None:
            raise RuntimeError("this Recorder is already attached to an optimizer")
        if self.steps:
            raise RuntimeError("attach the Recorder before the first step (rec.step was already called)")
        if self.history == "all":
            raise UnsupportedTrainingError("history='all' (DeltaGrad) records the batches by hand: call "
                                           "rec.step(lr, indices=batch) instead of attach()")
        adapter = adapter_for(optimizer)
        where = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        missing = [n for n, p in zip(self.layout.names, self._params) if id(p) not in where]
        if missing:
            raise UnsupportedTrainingError(
                f"parameters {missing[:4]} are covered by the Recorder but not optimised by the "
                "attached optimizer; pass Recorder(params=[...]) with the trained parameters only")
        group_of = [where[id(p)] for p in self._params]
        steps = []
        for g in optimizer.param_groups:  # resume: the optimizer may have stepped already
            st = [optimizer.state[p].get("step", None) for p in g["params"] if p in optimizer.state]
            if st and st[0] is not None:
                steps.append(int(st[0]))
            elif any("momentum_buffer" in optimizer.state[p] for p in g["params"] if p in optimizer.state):
                steps.append(1)
            else:
                steps.append(0)
        self._group_steps = steps
        handles = (optimizer.register_step_pre_hook(self._pre_hook),
                   optimizer.register_step_post_hook(self._post_hook))
        self._optim = (optimizer, adapter, group_of, handles)
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (recording stops; finalize still works)."""
        self._fwd_hook.remove()
        if self._optim is not None:
            for h in self._optim[3]:
                h.remove()

    def _pre_hook(self, opt, args, kwargs):
        if len(args) > 1 or kwargs.get("closure") is not None:  # args[0] is the optimizer
            raise UnsupportedTrainingError(
                f"{type(opt).__name__}.step(closure) re-evaluates the loss inside the step (as LBFGS "
                "does); its update has no recorded linearisation. Call step() without a closure")
        _, adapter, group_of, _ = self._optim
        rules = []
        for gi, g in enumerate(opt.param_groups):
            self._group_steps[gi] += 1
            rules.append(list(adapter.rule(opt, g, self._group_steps[gi]).key()))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        self._record(grads, rules)

    def _post_hook(self, opt, args, kwargs):
        _, adapter, group_of, _ = self._optim
        if adapter.preconditioned and self._open is not None and self.K:
            ds = [adapter.precond(opt, opt.param_groups[gi], p, self._group_steps[gi])
                  for p, gi in zip(self._params, group_of)]
            ds = self._open.parts([d.float() for d in ds])
            if ds:
                torch._foreach_add_(self._open.dsum, ds)
        if self._open is not None and self._open.steps >= self._seg_len:
            self._close()

    def step(self, lr: float, indices: torch.Tensor | None = None) -> None:
        """Record one plain-SGD step by hand: call after ``loss.backward()`` and before
        ``opt.step()``. (With ``attach`` the optimizer's hook records instead.)"""
        if self._optim is not None:
            raise RuntimeError("this Recorder is attached to an optimizer, which records every step; "
                               "do not also call rec.step()")
        if any(p.grad is None for p in self._params):
            raise RuntimeError("Recorder.step: a covered parameter has no .grad; call it after "
                               "loss.backward() and before opt.step()/zero_grad()")
        if self.history == "all":
            self._record_all(lr, indices)
        self._record([p.grad for p in self._params], [[float(lr)]])
        if self._open is not None and self._open.steps >= self._seg_len:
            self._close()

    def _record(self, grads: list[torch.Tensor], rules: list[list]) -> None:
        self.steps += 1
        self._batch_max = max(self._batch_max, self._last_batch)
        self.train_mode = self.train_mode or self.model.training
        if self.K == 0:
            return
        if self._open is None:
            precond = self._optim is not None and self._optim[1].preconditioned
            self._open = _Segment(self._params, len(rules), precond, self.span)
        if self._weights[0].data_ptr() != self._params[0].data_ptr():  # model moved (.to())
            self._weights = [p.detach() for p in self._params]
        self._open.add(grads, self._weights, rules)

    def _close(self) -> None:
        seg, self._open = self._open, None
        self._closed.append(self._compress(seg))
        if not self._fixed_len and len(self._closed) >= 2 * self.K:
            old = self._closed
            self._closed = [self._merge(a, b) for a, b in zip(old[::2], old[1::2])]
            for c in old:
                c.drop()
            self._seg_len *= 2

    def _compress(self, seg: _Segment) -> _Closed:
        comp, on_dev = {}, 0
        for k, v in seg.flat.items():  # the means, in place, compressed one by one
            # d = 1/(√v̂ + ε) spans many decades (1/ε where v = 0): blockwise int codes would
            # zero the small values, so it keeps a floating format
            fmt = "bf16" if (k == "d" and self.fmt not in ("fp32", "bf16")) else self.fmt
            comp[k] = _to_cpu(compress(v.div_(seg.steps), fmt, block=self.block))
            on_dev = max(on_dev, comp[k].data.numel() * comp[k].data.element_size())
        self.peak_device_bytes = max(self.peak_device_bytes, seg.nbytes() + on_dev + self._closed_device_bytes())
        return _Closed(comp, seg.steps, seg.runs, self.spill_dir)

    def _closed_device_bytes(self) -> int:
        dev = self._params[0].device
        return sum(c.host_nbytes() for c in self._closed) if dev.type == "cpu" else 0

    def _merge(self, a: _Closed, b: _Closed) -> _Closed:
        va, vb = a.vecs(), b.vecs()
        n = a.steps + b.steps
        vecs = {k: compress((decompress(va[k]) * a.steps + decompress(vb[k]) * b.steps) / n, va[k].fmt,
                            block=self.block) for k in va}
        runs = [list(map(list, ra)) for ra in a.runs]
        for ra, rb in zip(runs, b.runs):
            for r in rb:
                _add_run(ra, r[:-1], r[-1])
        return _Closed(vecs, n, runs, self.spill_dir)

    def device_bytes(self) -> int:
        """Bytes this Recorder holds now on the model's device (open sums + closed segments
        that live there: on a CPU model without ``spill_dir``, host memory is the device)."""
        return (self._open.nbytes() if self._open is not None else 0) + self._closed_device_bytes()

    def _record_all(self, lr, indices):
        if indices is None:
            raise ValueError("history='all' needs the batch: call step(lr, indices=batch_indices)")
        w = self.layout.flatten(self._params)
        g = self.layout.flatten([p.grad for p in self._params])
        if self.span is not None:  # this rank's slice only (the full vectors are transient)
            w, g = w[self.span[0]:self.span[1]].clone(), g[self.span[0]:self.span[1]].clone()
        if not self._all_w:
            self._w0 = w.clone()  # the replay's start, kept exact (quantising it costs DeltaGrad)
        self._all_w.append(compress(w, self.fmt, block=self.block))
        self._all_g.append(compress(g, self.fmt, block=self.block))
        self._all_batches.append(torch.as_tensor(indices, dtype=torch.int64).cpu())
        self._all_lr.append(float(lr))

    # ---- after training ----
    def finalize(self, train_data, loss_fn, weight_decay: float | None = None, *, batch_size: int | None = None,
                 progress: bool = True, device=None, exact_checkpoint_grads: bool = False,
                 segment_spectra: int = 0, data_is_sharded: bool | None = None) -> GradientLog:
        """Anchor + curvature pass over ``train_data`` (X, y tensors, Dataset or DataLoader);
        ``loss_fn(outputs, targets)`` is the mean loss. Returns the log.

        ``weight_decay``: λ of the training objective F = L + (λ/2)‖w‖² (one-shot and refresh
        solve it; the trajectory uses the recorded optimizer's own decay). Default: the attached
        optimizer's coupled weight decay when all its groups share one, else 0.
        ``device``: where the passes run (default: the model's device).
        The passes see the model in the mode training computed its gradients in (train mode:
        batch statistics), without changing its buffers. ``batch_size`` (default
        :func:`~mini_unlearn.curvature.pass_batch_size`): training's own batch size when
        BatchNorm/InstanceNorm layers use batch statistics (so the pass normalises as training
        did; also the cache-friendly size for convolutions), else 512.

        ``exact_checkpoint_grads=True`` replaces each segment's mean minibatch gradient by the
        full-data gradient at the segment's mean weights (K extra passes over the data): a
        study option. ``segment_spectra=m`` (> 0) also stores each segment's curvature spectra,
        projected into the final K-FAC eigenbasis, from m training samples at its mean weights.

        Inside a torchrun job (see the class docstring) ``finalize`` is a collective: each rank
        runs the pass over its share of ``train_data`` and the sums (loss, gradient, K-FAC
        factors, diagonals) are all-reduced; each layer's eigendecompositions run on one owner
        rank (balanced by cost ∝ d³), and the result is this rank's shard of the log (save it
        with ``log.save(path)`` on every rank). ``data_is_sharded``: False: ``train_data`` is the
        whole data set on every rank (each takes ``rank::world``); True: it is already this
        rank's part; None (default): True for a DataLoader with a DistributedSampler
        (:func:`mini_unlearn.distributed.local_share`). The two study options are single-process."""
        batch_size = pass_batch_size(self.model, self.train_mode, self._batch_max, batch_size)
        if self.comm is not None:
            return self._finalize_dist(train_data, loss_fn, weight_decay, batch_size, progress, device,
                                       exact_checkpoint_grads, segment_spectra, data_is_sharded)
        model, layout = self.model, self.layout
        if device is None:
            device = self._params[0].device
        lam = self._default_decay() if weight_decay is None else float(weight_decay)
        n = _batches.count(train_data)
        blocks, diag_names = kron_blocks(model, layout, self.max_factor_bytes)
        exact = self.curvature == "exact"
        mode_kw = {"train_mode": bool(self.train_mode)}
        if self.fisher == "auto":
            self.fisher = auto_fisher(model, _num_outputs(model, train_data, device))
        if self.fisher == "mc":
            mode_kw.update(mc_samples=self.mc_samples, seed=0)
        bar = tqdm(total=n, desc="mini_unlearn: anchor + curvature pass", disable=not progress, leave=False)
        try:
            sums = data_pass(model, layout, train_data, loss_fn, curvature=not exact, blocks=blocks,
                             diag_names=diag_names, fisher=self.fisher, batch_size=batch_size,
                             device=device, progress=bar, traces=True, **mode_kw)
        finally:
            bar.close()
        log = GradientLog.for_model(model, params=layout.names, fmt=self.fmt, block=self.block)
        w_a = layout.get(model)
        log.put("anchor/w", w_a, exact=True)
        log.put("anchor/g", sums.grad / n, exact=True)
        meta = log.meta
        meta.update(n_train=n, weight_decay=lam, loss_reduction="mean", anchor_loss=sums.loss / n,
                    curvature=self.curvature, fisher=self.fisher, mc_samples=self.mc_samples, history=self.history,
                    steps_recorded=self.steps, grad_includes_weight_decay=self.grad_includes_wd,
                    train_mode=bool(self.train_mode))
        self._fwd_hook.remove()
        if self._batch_max:
            meta["batch_size"] = self._batch_max  # the recipe's (a last partial batch is smaller)
        meta["pass_batch_size"] = batch_size
        if self._optim is not None:
            opt, adapter, group_of, _ = self._optim
            meta["optimizer"] = {"name": type(opt).__name__, "preconditioned": adapter.preconditioned,
                                 "group_of": dict(zip(layout.names, group_of))}
        if exact:
            log.put("hessian", dense_hessian(model, layout, train_data, loss_fn, batch_size, device) / n,
                    exact=True)
        else:
            meta["kron_blocks"] = [b.to_meta() for b in blocks]
            meta["diag_params"] = list(diag_names)
            meta["kfac_traces"] = _traces(sums)  # conv blocks: the trace calibration's means
            for b in blocks:
                for side, m in (("A", sums.A[b.module]), ("G", sums.G[b.module])):
                    if m.dim() == 1:  # a diagonal factor (embedding inputs, memory bound): no basis
                        log.put(f"kfac/{b.module}/s_{side}", (m / n).clamp_min(0), exact=True)
                        continue
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

    def _finalize_dist(self, train_data, loss_fn, weight_decay, batch_size, progress, device,
                       exact_checkpoint_grads, segment_spectra, data_is_sharded) -> GradientLog:
        """``finalize`` on rank k of N (see there): this rank's shard of the log."""
        from .distributed import gather_ints, local_share, summed_pass

        comm, model, layout = self.comm, self.model, self.layout
        if exact_checkpoint_grads or segment_spectra:
            raise UnsupportedTrainingError("exact_checkpoint_grads and segment_spectra are single-process "
                                           "study options; run them without torchrun")
        if device is None:
            device = self._params[0].device
        lam = self._default_decay() if weight_decay is None else float(weight_decay)
        blocks, diag_names = kron_blocks(model, layout, self.max_factor_bytes)
        exact = self.curvature == "exact"
        mode_kw = {"train_mode": bool(self.train_mode)}
        if self.fisher == "auto":  # every rank probes the same sample: the same answer everywhere
            probe = local_share(comm, train_data, data_is_sharded) if data_is_sharded else train_data
            self.fisher = auto_fisher(model, _num_outputs(model, probe, device))
        if self.fisher == "mc":
            mode_kw.update(mc_samples=self.mc_samples, seed=0)
        show = progress and comm.rank == 0

        def run_pass(part):
            bar = tqdm(total=_batches.count(part), desc="mini_unlearn: anchor + curvature pass (rank 0's share)",
                       disable=not show, leave=False)
            try:
                return data_pass(model, layout, part, loss_fn, curvature=not exact, blocks=blocks,
                                 diag_names=diag_names, fisher=self.fisher, batch_size=batch_size,
                                 device=device, progress=bar, traces=True, **mode_kw)
            finally:
                bar.close()

        sums = summed_pass(comm, train_data, run_pass, data_is_sharded=data_is_sharded)
        n = sums.n
        lo, hi = self.span
        log = GradientLog.for_model(model, params=layout.names, fmt=self.fmt, block=self.block)
        log = log.shard_of(comm.rank, comm.world, align=self.block)
        if (log.lo, log.hi) != (lo, hi):  # the recorder's slices are the log's shard ranges
            raise AssertionError(f"shard range {(log.lo, log.hi)} != recorded slice {(lo, hi)}")
        w_a = layout.get(model)
        log.put("anchor/w", w_a, exact=True, placement="flat")
        log.put("anchor/g", sums.grad[lo:hi] / n, exact=True, placement="flat")
        meta = log.meta
        meta.update(n_train=n, weight_decay=lam, loss_reduction="mean", anchor_loss=sums.loss / n,
                    curvature=self.curvature, fisher=self.fisher, mc_samples=self.mc_samples, history=self.history,
                    steps_recorded=self.steps, grad_includes_weight_decay=self.grad_includes_wd,
                    train_mode=bool(self.train_mode), recorded_by_ranks=comm.world,
                    pass_batch_size=batch_size)  # unlearn's passes use finalize's batch size
        if self._optim is not None:
            opt, adapter, group_of, _ = self._optim
            meta["optimizer"] = {"name": type(opt).__name__, "preconditioned": adapter.preconditioned,
                                 "group_of": dict(zip(layout.names, group_of))}
        if exact:
            H = comm.run(lambda: dense_hessian(model, layout, local_share(comm, train_data, data_is_sharded),
                                               loss_fn, batch_size, device))
            log.put("hessian", comm.sum_(H) / n, exact=True)
        else:
            meta["kron_blocks"] = [b.to_meta() for b in blocks]
            meta["diag_params"] = list(diag_names)
            meta["kfac_traces"] = _traces(sums)  # conv blocks: the trace calibration's means
            owners = comm.owners([float(sum(m.shape[0] ** 3 for m in (sums.A[b.module], sums.G[b.module])
                                            if m.dim() == 2)) for b in blocks])
            meta["kfac_owners"] = dict(zip([b.module for b in blocks], owners))
            mine = [(b, side) for b, o in zip(blocks, owners) if o == comm.rank for side in ("A", "G")]
            # the owner's eigendecompositions; a failure on any rank raises on every rank
            eig = comm.run(lambda: {(b.module, side): eigh_psd(getattr(sums, side)[b.module] / n)
                                    for b, side in mine if getattr(sums, side)[b.module].dim() == 2})
            for b, o in zip(blocks, owners):
                for side in ("A", "G"):
                    m = getattr(sums, side)[b.module]
                    if m.dim() == 1:  # a diagonal factor: the all-reduced sum is the spectrum
                        log.put(f"kfac/{b.module}/s_{side}", (m / n).clamp_min(0), exact=True, owner=o)
                        continue
                    s_, U = eig.get((b.module, side)) or (torch.empty(m.shape[0]), torch.empty(m.shape))
                    log.put(f"kfac/{b.module}/U_{side}", U, owner=o)
                    log.put(f"kfac/{b.module}/s_{side}", s_, exact=True, owner=o)
            if diag_names:
                log.put("diag/nu", sums.diag / n, exact=True)
        self._finalize_segments(log, w_a[lo:hi], lam, None)
        if self.history == "all":
            self._finalize_all(log, gather_ints)
        meta["modes"] = ["oneshot", "refresh"] + (["trajectory"] if meta.get("segments") else []) \
            + (["deltagrad"] if self.history == "all" else [])
        log.train_data = train_data  # in memory only: lets unlearn(indices=...) find the rows
        return log

    def _default_decay(self) -> float:
        if self._optim is None or not self._open and not self._closed:
            return 0.0
        seg = self._open if self._open is not None and self._open.steps else self._closed[-1]
        lams = {runs[-1][3] for runs in seg.runs if runs}
        return float(lams.pop()) if len(lams) == 1 else 0.0

    def _finalize_segments(self, log: GradientLog, w_a: torch.Tensor, lam: float, exact=None) -> None:
        segs = list(self._closed)
        if self._open is not None and self._open.steps:
            segs.append(self._compress(self._open))
            self._open = None
            self._closed = list(segs)
        while self.K and len(segs) > self.K:  # thin to at most K
            segs = [self._merge(a, b) for a, b in zip(segs[::2], segs[1::2])] + (segs[-1:] if len(segs) % 2 else [])
        self._closed = segs
        info = []
        for seg in segs:
            v = seg.vecs()
            g = v["grad"]
            if self.grad_includes_wd or exact is not None:
                w = decompress(v["w"]).to(w_a.device)
                gd = decompress(g).to(w_a.device)
                if self.grad_includes_wd:
                    gd = gd - lam * w  # the mean of (∇L + λw) over the segment, minus λ·mean(w)
                if exact is not None:  # the full-data gradient at the segment's mean weights
                    data, loss_fn, bs, dev = exact
                    self.layout.set(self.model, w)
                    s = data_pass(self.model, self.layout, data, loss_fn, batch_size=bs, device=dev,
                                  train_mode=bool(self.train_mode))
                    gd = s.grad / s.n
                    self.layout.set(self.model, w_a)
                g = gd
            flat = "flat" if self.span is not None else None  # a rank's slices
            log.append_row("ckpt/grad", g, placement=flat)
            log.append_row("ckpt/w", v["w"], placement=flat)
            if "d" in v:
                log.append_row("ckpt/d", v["d"], placement=flat)
            if self._optim is None:
                info.append({"steps": seg.steps, "lr_runs": _compact(seg.runs[0], seg.steps)})
            else:
                info.append({"steps": seg.steps, "groups": [_compact(r, seg.steps) for r in seg.runs]})
        log.meta["segments"] = info

    def _segment_spectra(self, log, blocks, diag_names, w_a, data, loss_fn, m, batch_size, device):
        """Curvature at each segment's mean weights on m samples, as spectra in the final basis:
        diag(Uᵀ A_k U) per K-FAC factor (the contraction early in training is stronger than the
        final, confident model's curvature suggests)."""
        n = _batches.count(data)
        sub = _batches.subset(data, torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m]) \
            if m < n else data
        for k in range(len(log.meta["segments"])):
            self.layout.set(self.model, segment_weights(log, k, w_a))
            sums = data_pass(self.model, self.layout, sub, loss_fn, curvature=True, blocks=blocks,
                             diag_names=diag_names, fisher=self.fisher, batch_size=batch_size, device=device,
                             train_mode=bool(self.train_mode))
            scales = trace_scales(log.meta)
            for b in blocks:
                for side in ("A", "G"):
                    M = getattr(sums, side)[b.module] / sums.n
                    if side == "G":  # the trace calibration of this pass (curvature/conv2d.py)
                        M = M * scales.get(b.module, 1.0)
                    if M.dim() == 1:  # a diagonal factor is its own spectrum
                        log.put(f"seg/{k}/{b.module}/s_{side}", M.clamp_min(0), exact=True)
                        continue
                    U = log.get(f"kfac/{b.module}/U_{side}").to(M.device)
                    log.put(f"seg/{k}/{b.module}/s_{side}", ((M @ U) * U).sum(0).clamp_min(0), exact=True)
            if diag_names:
                log.put(f"seg/{k}/diag/nu", sums.diag / sums.n, exact=True)
        self.layout.set(self.model, w_a)
        log.meta["segment_spectra"] = m

    def _finalize_all(self, log: GradientLog, gather_ints=None) -> None:
        flat = "flat" if self.span is not None else None
        log.put("all/w0", self._w0, exact=True, placement=flat)
        for w, g in zip(self._all_w, self._all_g):
            log.append_row("all/w", w, placement=flat)
            log.append_row("all/g", g, placement=flat)
        sizes = torch.tensor([len(b) for b in self._all_batches], dtype=torch.int64)
        idx = torch.cat(self._all_batches) if self._all_batches else torch.zeros(0, dtype=torch.int64)
        if gather_ints is not None:  # a step's batch is the union of the ranks' batches, in rank order
            all_sizes, all_idx = gather_ints(self.comm, sizes), gather_ints(self.comm, idx)
            if len({s.numel() for s in all_sizes}) != 1:
                raise UnsupportedTrainingError(f"the ranks recorded different numbers of steps "
                                               f"{[s.numel() for s in all_sizes]}")
            parts = [list(torch.split(i, s.tolist())) for i, s in zip(all_idx, all_sizes)]
            sizes = torch.stack(all_sizes).sum(0)
            idx = torch.cat([p[k] for k in range(len(self._all_batches)) for p in parts]) \
                if self._all_batches else idx
        log.put("all/batch_sizes", sizes, exact=True)
        log.put("all/batch_indices", idx, exact=True)
        log.put("all/lr", torch.tensor(self._all_lr), exact=True)


def segment_weights(log: GradientLog, k: int, w_a: torch.Tensor) -> torch.Tensor:
    """Segment k's mean weights (logs store them as ``ckpt/w``; older ones as ``ckpt/wdiff``)."""
    if "ckpt/w" in log.row_lists:
        return log.row("ckpt/w", k).to(w_a.device)
    return w_a + log.row("ckpt/wdiff", k).to(w_a.device)


def _traces(sums) -> dict[str, list[float]]:
    """Per trace-calibrated block, [exact, Kronecker-model] per-sample curvature traces, means
    over the samples they were measured on (curvature/conv2d.py, "Trace calibration")."""
    keys = sorted(sums.sq)
    vals = torch.stack([torch.as_tensor(sums.sq[k]).double() for k in keys]).tolist() if keys else []
    return {k: [v[0] / max(v[2], 1.0), v[1] / max(v[2], 1.0)] for k, v in zip(keys, vals)}


def _num_outputs(model: nn.Module, data, device) -> int:
    """The size of the model's last output axis (classes / vocabulary), from one sample."""
    import copy as _copy

    x, _ = next(iter(_batches.batches(data, 1, device)))
    probe = _copy.deepcopy(model).eval()
    with torch.no_grad():
        return int(probe(x).shape[-1])
