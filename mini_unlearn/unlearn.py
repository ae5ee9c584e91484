"""``unlearn()``: remove a forget set's influence from a trained model with a recorded log."""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _batches
from .curvature import pass_batch_size
from .errors import ForgetSetError, LogMismatchError, NonFiniteError
from .methods import METHODS


@dataclass
class UnlearnResult:
    """What an unlearning run produced and what it cost."""

    model: nn.Module
    method: str
    mode: str | None
    passes: int  # passes over a data set (forget or retained), the unit of cost
    grad_evals: int  # sample-gradient evaluations
    certificate: float | None  # ‖∇F_R(w_u)‖ / ‖∇F_R(w_a)‖ where the method checks it
    verified: bool  # True only when the certificate met the tolerance
    seconds: float
    history_bytes: int
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        cert = "unverified" if self.certificate is None else f"certificate {self.certificate:.2e}"
        return (f"{self.method}/{self.mode}: {self.passes} passes, {self.grad_evals} sample gradients, "
                f"{self.seconds:.3f} s, {cert}")


def _forget_from_indices(indices, train_data, n: int):
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ForgetSetError(f"indices must be a 1-D integer tensor or list, got {idx.dtype} of shape "
                             f"{tuple(idx.shape)}")
    idx = idx.long()
    if idx.numel() == 0:
        raise ForgetSetError("the forget set is empty: pass at least one index")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.numel():
        raise ForgetSetError(f"forget indices out of range [0, {n}): {bad[:5].tolist()}")
    if torch.unique(idx).numel() != idx.numel():
        raise ForgetSetError("forget indices are repeated; pass each sample once (torch.unique)")
    if train_data is None:
        raise ForgetSetError("indices= needs the training data: pass train_data= (the data given "
                             "to Recorder.finalize)")
    return _batches.subset(train_data, idx), idx


def _check_forget(forget, work: nn.Module, n: int) -> int:
    """The forget set's size, after checking it; ``work`` is the private copy (never the caller's
    model: a forward pass in train mode would update its BatchNorm statistics)."""
    if isinstance(forget, (tuple, list)) and len(forget) == 2 and torch.is_tensor(forget[0]):
        X, y = forget
        if X.dim() < 1 or X.shape[0] == 0:
            raise ForgetSetError("the forget set is empty: pass at least one sample")
        if y.shape[:1] != X.shape[:1]:
            raise ForgetSetError(f"forget X has {X.shape[0]} rows but y has {y.shape[0] if y.dim() else 0}")
        p = next(work.parameters())
        if X.device != p.device or y.device != p.device:
            raise ForgetSetError(f"forget tensors are on {X.device}/{y.device} but the model is on "
                                 f"{p.device}; move them with .to(device)")
        if X.is_floating_point() and not torch.isfinite(X).all():
            raise ForgetSetError("forget X contains NaN/Inf")
        if X.is_complex() or X.dtype == torch.bool:
            raise ForgetSetError(f"forget X must be real floating point or integer (token ids), got {X.dtype}")
        modes = [m.training for m in work.modules()]
        try:
            with torch.no_grad():
                work.eval()(X[:1])
        except Exception as exc:  # wrong feature shape/dtype for this model
            raise ForgetSetError(f"the model cannot run on the forget samples (X shape "
                                 f"{tuple(X.shape)}, dtype {X.dtype}): {exc}") from exc
        finally:
            for m, mode in zip(work.modules(), modes):
                m.training = mode
    r = _batches.count(forget)
    if r == 0:
        raise ForgetSetError("the forget set is empty: pass at least one sample")
    if r >= n:
        raise ForgetSetError(f"the forget set has {r} samples but the log covers only n={n}: "
                             "nothing would be retained (retrain from scratch instead)")
    return r


def unlearn(model: nn.Module, log, forget=None, *, loss_fn, method: str = "mini", mode: str = "auto",
            retain=None, indices=None, train_data=None, max_passes: int = 8, tol: float = 1e-6,
            in_place: bool = False, batch_size: int | None = None, progress: bool = False,
            recalibrate: bool = True, group=None, **method_kwargs) -> UnlearnResult:
    """Remove the influence of ``forget`` from ``model`` using the recorded ``log``.

    Args:
        model: the trained model the log was recorded from.
        log: a :class:`GradientLog` from :meth:`Recorder.finalize` (or ``GradientLog.load``).
        forget: the samples to forget: ``(X, y)`` tensors, a Dataset or a DataLoader; or pass
            ``indices=`` into the training data (``train_data=``, default: the data given to
            ``finalize`` in this process). Methods that replay training ("deltagrad") need
            ``indices=``; they receive the index tensor as ``forget_indices=`` and
            ``train_data=`` (None when not given).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss (the training loss).
        method: "mini" (Mini-Unlearning) or a baseline registered in ``mini_unlearn.methods``.
        mode: for "mini": "auto", "oneshot", "trajectory" or "refresh".
        retain: the retained data (refresh mode and some baselines).
        max_passes: refresh's budget of retained passes; tol: its stopping rule ‖∇F_R‖ ≤ tol·‖g0‖.
        in_place: write the result into ``model`` (parameters and buffers); otherwise ``model``
            is never modified (and never on failure: every check runs before anything is written).
        batch_size: the data passes' batch size (default: the log's ``pass_batch_size``, i.e.
            training's batch size for models with batch-statistics normalisation, else 512).
        recalibrate: models with BatchNorm running statistics: recompute them on ``retain`` with a
            forward-only pass when it is given; otherwise the original's statistics are kept
            (``result.info["norm_stats"]`` says which).
        group: the torch.distributed process group (default: the world group if initialised).
        **method_kwargs: passed to the method (e.g. ``unstable="clip"`` for "mini").

    Inside a torchrun job of N ≥ 2 ranks (method "mini" only; others raise
    UnsupportedTrainingError) every rank calls ``unlearn`` with the same model, log (its shard,
    or a full log) and forget set: the log's shards are gathered once, each forget/retained pass
    runs over this rank's ``rank::world`` share with its sums all-reduced, and the rest runs
    identically on every rank, so every rank returns the same unlearned model. If any rank fails,
    every rank raises the same :class:`~mini_unlearn.distributed.DistributedError` and no rank's
    model is modified (docs/distributed.md).

    Every result is checked: finite parameters and buffers, and (trajectory) a training map that
    contracts in every direction under the recorded optimizer; anything else raises a typed
    error and leaves ``model`` untouched.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    from .distributed import communicator
    comm = communicator(group)
    if comm is None:
        work, out, seconds = _compute(model, log, forget, loss_fn, method, mode, retain, indices, train_data,
                                      max_passes, tol, batch_size, progress, recalibrate, None, method_kwargs)
    else:
        if "comm" not in inspect.signature(METHODS[method]).parameters:
            from .errors import UnsupportedTrainingError
            raise UnsupportedTrainingError(
                f"method {method!r} has no data-parallel path: inside a torchrun job only method='mini' "
                "runs (its passes are split across the ranks); run the others in one process")
        if getattr(log, "is_shard", False):  # collective, before any user code can fail on one rank
            full = log.gather(group=group)
            full.train_data = getattr(log, "train_data", None)
            log = full
        work, out, seconds = comm.run(lambda: _compute(
            model, log, forget, loss_fn, method, mode, retain, indices, train_data, max_passes, tol,
            batch_size, progress and comm.rank == 0, recalibrate, comm, method_kwargs))
        out["ranks"] = comm.world
    if in_place:  # only now, after every rank succeeded
        with torch.no_grad():
            for dst, src in zip(model.parameters(), work.parameters()):
                dst.copy_(src)
            for dst, src in zip(model.buffers(), work.buffers()):
                dst.copy_(src)
        work = model
    info = {k: v for k, v in out.items() if k not in ("mode", "passes", "grad_evals", "certificate", "verified")}
    return UnlearnResult(work, method, out.get("mode"), int(out.get("passes", 0)),
                         int(out.get("grad_evals", 0)), out.get("certificate"),
                         bool(out.get("verified", False)), seconds, int(log.nbytes()), info)


def _compute(model, log, forget, loss_fn, method, mode, retain, indices, train_data, max_passes, tol,
             batch_size, progress, recalibrate, comm, method_kwargs) -> tuple[nn.Module, dict, float]:
    """The unlearned copy of ``model``, the method's result fields and the seconds it took;
    ``model`` itself is never written here."""
    log.check_model(model)
    n = int(log.meta["n_train"])
    forget_indices = None
    if indices is not None:
        if forget is not None:
            raise ForgetSetError("pass either forget= or indices=, not both")
        forget, forget_indices = _forget_from_indices(indices, train_data if train_data is not None
                                                      else getattr(log, "train_data", None), n)
    if forget is None:
        raise ForgetSetError("nothing to forget: pass forget=(X, y) or indices=")
    if batch_size is None:
        batch_size = int(log.meta.get("pass_batch_size") or pass_batch_size(
            model, log.meta.get("train_mode"), log.meta.get("batch_size")))
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.grad = None
    r = _check_forget(forget, work, n)
    device = next(model.parameters()).device
    w_model = log.flatten(model)
    if getattr(log, "is_shard", False):  # a shard's own slice (group=LOCAL inside torchrun)
        w_model = log.local(w_model)
    w_a = log.get("anchor/w").to(device)
    if not torch.allclose(w_model, w_a, rtol=1e-5, atol=1e-6):
        raise LogMismatchError("the model's weights differ from the log's anchor: unlearn the model "
                               "the log was finalized on (or re-finalize the log for this model)")
    # Methods that replay training (DeltaGrad) need the forget set as rows of the training data.
    extra = _accepted(METHODS[method], forget_indices=forget_indices, train_data=train_data)
    if comm is not None:
        extra["comm"] = comm
    t0 = time.perf_counter()
    out = METHODS[method](work, log, forget, loss_fn, mode=mode, retain=retain, r=r,
                          max_passes=max_passes, tol=tol, batch_size=batch_size, device=device,
                          progress=progress, **extra, **method_kwargs)
    _check_result(work, model)
    if recalibrate and retain is not None and _has_running_stats(work):
        from .curvature import recalibrate_norm_stats

        recalibrate_norm_stats(work, retain, batch_size=batch_size, device=device)
        out.setdefault("norm_stats", "recalibrated on retain")
    elif _has_running_stats(work):
        out.setdefault("norm_stats", "kept from the original model (pass retain= to recalibrate)")
    return work, out, time.perf_counter() - t0


def _has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in model.modules())


def _check_result(work: nn.Module, model: nn.Module) -> None:
    """The unlearned copy must be finite (parameters and floating buffers)."""
    for name, t in list(work.named_parameters()) + list(work.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"the unlearned model has NaN/Inf in {name!r}; the caller's model was not "
                                 "changed. Check the log and the forget set, or try another mode/method")


def _accepted(fn, **kwargs) -> dict:
    """The keyword arguments ``fn`` declares (or all of them if it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}
