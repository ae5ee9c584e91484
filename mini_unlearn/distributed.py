"""Data-parallel plumbing for recording and unlearning inside a torchrun job.

Everything here is a thin layer over torch.distributed (no scheme of our own, no pickling):
:func:`communicator` returns ``None`` when no process group is initialised, so callers keep
the single-process path exactly as it is (``if comm is None: <old code>``). With a group, a
:class:`Communicator` is the small object passed into data passes and sums:

* ``comm.slice(dim)``: this rank's contiguous ``[lo, hi)`` of a flat history vector (the same
  balanced split as :func:`mini_unlearn.log.shard_range`, so recorder slices and log shards agree);
* ``comm.indices(n)``: this rank's share of ``n`` samples, the DistributedSampler convention
  without padding (``rank::world``), so sums over ranks count each sample once;
* ``comm.sum_(t)``: in-place all-reduce (loss sums, K-FAC factors, diagonals, G_R);
* ``comm.sum_slice(vec)``: this rank's slice of the all-reduced flat vector (gradient sums);
* ``comm.owners(costs)``: an owner rank per layer, balanced by cost (``assign_owners``, KAISA-style);
* ``comm.from_owner(t, owner)``: broadcast a layer's result from its owner;
* ``comm.agree(exc)``: every rank learns whether any rank failed and raises the same
  :class:`DistributedError` (collectives run under the group's timeout, so a dead rank gives an
  error, not a hang).

Backends: gloo on CPU (tested, 2 processes on 127.0.0.1); NCCL on GPUs takes the same code path
with tensors on ``cuda:current_device()`` (not run here: no GPUs).
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, TypeVar

import torch

from .errors import MiniUnlearnError
from .log._format import assign_owners, shard_range

T = TypeVar("T")


class DistributedError(MiniUnlearnError, RuntimeError):
    """Raised on every rank when any rank failed inside a collective step; ``failed`` lists the
    failing ranks, ``cause`` is this rank's own exception (None on healthy ranks)."""

    def __init__(self, failed: list[int], cause: BaseException | None = None):
        self.failed = failed
        self.cause = cause
        super().__init__(f"rank(s) {failed} failed" + (f": {type(cause).__name__}: {cause}" if cause else ""))


def _initialised() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def communicator(group: Any = None, timeout: float | None = None) -> "Communicator | None":
    """A :class:`Communicator` for ``group`` if torch.distributed is initialised and the group has
    more than one rank, else ``None`` (the single-process path)."""
    if not _initialised():
        return None
    import torch.distributed as dist
    if dist.get_world_size(group) < 2:
        return None
    return Communicator(group, timeout)


class Communicator:
    """See the module docstring."""

    def __init__(self, group: Any = None, timeout: float | None = None):
        import torch.distributed as dist
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = timeout
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(group) == "nccl" else torch.device("cpu"))

    # -- splits ---------------------------------------------------------------------------
    def slice(self, dim: int, align: int = 1) -> tuple[int, int]:
        return shard_range(dim, self.rank, self.world, align)

    def indices(self, n: int) -> torch.Tensor:
        return torch.arange(self.rank, n, self.world)

    def shard_data(self, data):
        """This rank's share (``indices(n)``) of ``data`` (X, y tensors, Dataset or DataLoader):
        the anchor/curvature pass and forget passes run over it, and their sums are all-reduced."""
        from . import _batches
        return _batches.subset(data, self.indices(_batches.count(data)))

    def owners(self, costs: list[float]) -> list[int]:
        return assign_owners(list(costs), self.world)

    # -- collectives ----------------------------------------------------------------------
    def _global(self, r: int) -> int:
        return self.dist.get_global_rank(self.group, r) if self.group is not None else r

    def _wait(self, work) -> None:
        if self.timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=self.timeout))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place and return it."""
        buf = t if t.device == self.device else t.to(self.device)
        self._wait(self.dist.all_reduce(buf, group=self.group, async_op=True))
        if buf is not t:
            t.copy_(buf)
        return t

    def sum_slice(self, vec: torch.Tensor, align: int = 1) -> torch.Tensor:
        """This rank's slice of the sum over ranks of the flat ``vec``. (An all-reduce then a
        slice: gloo has no uneven reduce-scatter; the memory held afterwards is the slice.)"""
        full = self.sum_(vec.detach().clone())
        lo, hi = self.slice(full.numel(), align)
        return full[lo:hi].clone()

    def from_owner(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        """``t`` of rank ``owner`` on every rank (in place; shapes must agree)."""
        buf = t if t.device == self.device else t.to(self.device)
        self._wait(self.dist.broadcast(buf, self._global(owner), group=self.group, async_op=True))
        if buf is not t:
            t.copy_(buf)
        return t

    def agree(self, exc: BaseException | None = None) -> None:
        """Collective: raise the same :class:`DistributedError` on every rank if any rank passed
        an exception (the failing ranks are listed); return normally if none did."""
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(exc is not None)
        self.sum_(flags)
        failed = [r for r in range(self.world) if flags[r].item()]
        if failed:
            raise DistributedError(failed, exc) from exc

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, then :meth:`agree`: either every rank returns or every rank
        raises :class:`DistributedError`. ``fn`` must not commit side effects (e.g. write the
        model) before returning; commit after ``run`` returns."""
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            self.agree(exc)
            raise  # unreachable: agree raised
        self.agree(None)
        return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The inner module of a DistributedDataParallel (or DataParallel) wrapper, else ``model``:
    ``Recorder(ddp_model)`` covers and names the same parameters as ``Recorder(ddp_model.module)``
    (no ``module.`` prefix), so the log applies to the unwrapped model."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
