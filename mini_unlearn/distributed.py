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
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch

from .errors import MiniUnlearnError
from .log._format import assign_owners, shard_range

if TYPE_CHECKING:  # pragma: no cover
    from .curvature import PassSums

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


#: pass as ``group=`` (``Recorder``, ``unlearn``) to run one call on this process alone inside a
#: torchrun job: e.g. the retraining oracle of the ``run`` experiment, repeated on every rank
LOCAL = "local"


def communicator(group: Any = None, timeout: float | None = None) -> "Communicator | None":
    """A :class:`Communicator` for ``group`` if torch.distributed is initialised and the group has
    more than one rank, else ``None`` (the single-process path; always for ``group=LOCAL``)."""
    if (isinstance(group, str) and group == LOCAL) or not _initialised():
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
        model) before returning; commit after ``run`` returns. Runs nest: a DistributedError
        raised inside ``fn`` was agreed on every rank already and passes through unchanged.
        Inside ``fn``, every collective must itself follow an agreement (``run``) of this kind,
        so that a rank failing between two of them meets the others at their next agreement."""
        try:
            out = fn()
        except DistributedError:  # already agreed by every rank (a nested run): raise it as is
            raise
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            self.agree(exc)
            raise  # unreachable: agree raised
        self.agree(None)
        return out


# -- data-parallel passes --------------------------------------------------------------------

def is_rank_local(data: Any) -> bool:
    """True for a DataLoader whose sampler is a ``DistributedSampler`` (it yields this rank's
    share already): what ``data_is_sharded=None`` detects."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    return isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler)


def local_share(comm: Communicator, data: Any, data_is_sharded: bool | None = None) -> Any:
    """This rank's part of ``data``.

    ``data_is_sharded=False``: ``data`` is the whole data set, identical on every rank, and the
    rank takes ``comm.indices(n)`` of it (``rank::world``). ``True``: ``data`` already is this
    rank's part (any loader; the parts of all ranks must together be each sample exactly once).
    ``None`` (default): True exactly for a DataLoader with a ``DistributedSampler``, which must not
    pad or drop (the data set's size a multiple of the world size), since a padded sample would
    count twice in the sums and a dropped one not at all."""
    from torch.utils.data.distributed import DistributedSampler
    sharded = is_rank_local(data) if data_is_sharded is None else bool(data_is_sharded)
    if not sharded:
        return comm.shard_data(data)
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        n = len(sampler.dataset)
        if sampler.total_size != n or n % comm.world:
            raise ValueError(
                f"the DistributedSampler over {n} samples pads or drops to {sampler.total_size} "
                f"for {comm.world} ranks, so some samples would count twice or not at all in the "
                f"sums: pass the whole data (data_is_sharded=False; each rank then takes rank::world) "
                f"or a data set whose size is a multiple of {comm.world}")
    return data


def _pack(sums: "PassSums", scale: float = 1.0) -> tuple[torch.Tensor, list]:
    """One float64 vector with n, the loss, the gradient, every factor and the diagonal."""
    parts = [torch.tensor([float(sums.n), sums.loss], dtype=torch.float64, device=sums.grad.device),
             sums.grad.double().reshape(-1)]
    spec: list = []
    for side in ("A", "G", "sq"):
        for k in sorted(getattr(sums, side)):
            t = torch.as_tensor(getattr(sums, side)[k])
            spec.append((side, k, tuple(t.shape), t.dtype))
            parts.append(t.double().reshape(-1))
    if sums.diag is not None:
        spec.append(("diag", None, tuple(sums.diag.shape), sums.diag.dtype))
        parts.append(sums.diag.double().reshape(-1))
    buf = torch.cat(parts)
    if scale != 1.0:
        buf.mul_(scale)
    return buf, spec


def _unpack(buf: torch.Tensor, spec: list, grad_dtype: torch.dtype, d: int) -> "PassSums":
    from .curvature import PassSums
    out = PassSums(n=int(round(float(buf[0]))), loss=float(buf[1]), grad=buf[2:2 + d].to(grad_dtype))
    o = 2 + d
    for side, k, shape, dt in spec:
        m = int(torch.Size(shape).numel())
        t = buf[o:o + m].reshape(shape).to(dt)
        o += m
        if side == "diag":
            out.diag = t
        else:
            getattr(out, side)[k] = t
    return out


def summed_pass(comm: Communicator, data: Any, run_pass: Callable[[Any], "PassSums"], *,
                data_is_sharded: bool | None = False) -> "PassSums":
    """``run_pass`` (a data pass returning :class:`~mini_unlearn.curvature.PassSums`) over this
    rank's share of ``data`` (:func:`local_share`), summed over the ranks: every rank gets the
    sums of the whole data (n, loss, gradient, K-FAC factors, diagonal), identical everywhere.

    The local pass runs under :meth:`Communicator.run`, so if it fails on any rank every rank
    raises the same :class:`DistributedError`; the sums then travel in one float64 all-reduce
    (float64, so the order of the ranks' partial sums costs no fp32 rounding). A rank whose share
    is empty (fewer samples than ranks) runs the pass on one sample and contributes zeros, so
    that every rank's sums have the same structure."""
    from . import _batches

    def local():
        part = local_share(comm, data, data_is_sharded)
        empty = not data_is_sharded and _batches.count(part) == 0
        if empty:  # same shapes as the others', zero weight
            part = _batches.subset(data, torch.arange(1))
        s = run_pass(part)
        buf, spec = _pack(s, 0.0 if empty else 1.0)
        return buf, spec, s.grad.dtype, s.grad.numel()

    buf, spec, dt, d = comm.run(local)
    self_sum = comm.sum_(buf)
    return _unpack(self_sum, spec, dt, d)


def gather_ints(comm: Communicator, values: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D int64 tensor (any length), in rank order (raw bytes, no pickle)."""
    from .log import _dist
    raw = values.detach().to(torch.int64).contiguous().cpu().numpy().tobytes()
    return [torch.frombuffer(bytearray(b), dtype=torch.int64).clone() if b else torch.zeros(0, dtype=torch.int64)
            for b in _dist.all_gather_bytes(raw, comm.group)]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The inner module of a DistributedDataParallel (or DataParallel) wrapper, else ``model``:
    ``Recorder(ddp_model)`` covers and names the same parameters as ``Recorder(ddp_model.module)``
    (no ``module.`` prefix), so the log applies to the unwrapped model."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
