"""torch.distributed plumbing of sharded logs: byte-level collectives (no pickle: payloads are
JSON or raw tensor bytes, never ``*_object`` collectives), barriers with timeouts, gathers."""
from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ._gradient_log import GradientLog


def _dist() -> Any:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("this operation on a sharded GradientLog is a collective: initialise "
                           "torch.distributed (init_process_group) on every rank first")
    return dist


def context(group: Any = None) -> tuple[int, int] | None:
    """``(rank, world)`` in ``group`` if torch.distributed is initialised, else None."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(group), dist.get_world_size(group)


def check_group(log: "GradientLog", group: Any) -> Any:
    """torch.distributed, after checking that ``group`` has ``log.world`` ranks and this process is
    ``log.rank`` in it."""
    dist = _dist()
    r, w = dist.get_rank(group), dist.get_world_size(group)
    if (r, w) != (log.rank, log.world):
        raise RuntimeError(f"this shard is rank {log.rank} of {log.world}, but this process is rank "
                           f"{r} of {w} in the process group")
    return dist


def _device(dist: Any, group: Any) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def barrier(timeout: float, group: Any = None) -> None:
    """A barrier that raises after ``timeout`` seconds (gloo: ``monitored_barrier``, which also
    names the missing ranks; other backends: ``barrier`` under the group's own timeout)."""
    dist = _dist()
    if dist.get_backend(group) == "gloo":
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout))
    else:
        dist.barrier(group)


def all_gather_bytes(payload: bytes, group: Any = None) -> list[bytes]:
    """Every rank's ``payload``, in rank order (lengths exchanged first, then padded bytes)."""
    dist = _dist()
    dev = _device(dist, group)
    w = dist.get_world_size(group)
    n = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(w)]
    dist.all_gather(sizes, n, group=group)
    lens = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lens + [1]), dtype=torch.uint8, device=dev)
    if payload:
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    outs = [torch.empty_like(buf) for _ in range(w)]
    dist.all_gather(outs, buf, group=group)
    return [bytes(o[:k].cpu().numpy().tobytes()) for o, k in zip(outs, lens)]


def broadcast_bytes(payload: bytes | None, src: int, group: Any = None) -> bytes:
    """``payload`` of rank ``src`` (group rank) on every rank."""
    dist = _dist()
    dev = _device(dist, group)
    me = dist.get_rank(group)
    n = torch.tensor([len(payload) if me == src and payload else 0], dtype=torch.int64, device=dev)
    gsrc = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast(n, gsrc, group=group)
    k = int(n.item())
    buf = torch.zeros(max(k, 1), dtype=torch.uint8, device=dev)
    if me == src and k:
        buf[:k] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    dist.broadcast(buf, gsrc, group=group)
    return bytes(buf[:k].cpu().numpy().tobytes())


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8, device=t.device)


def gather_flat(local: torch.Tensor, log: "GradientLog", group: Any = None) -> torch.Tensor:
    """Concatenate every rank's 1-D slice ``local`` of a flat vector (the ranks' ranges tile
    ``[0, log.dim)``); any dtype, moved as bytes."""
    dist = check_group(log, group)
    dev = _device(dist, group)
    es = local.element_size()
    sizes = [(hi - lo) * es for lo, hi in (log.shard_range(r) for r in range(log.world))]
    buf = torch.zeros(max(sizes + [1]), dtype=torch.uint8, device=dev)
    mine = _as_bytes(local).to(dev)
    if mine.numel() != sizes[log.rank]:
        raise ValueError(f"rank {log.rank}: slice of {local.numel()} elements, expected "
                         f"{sizes[log.rank] // es}")
    buf[:mine.numel()] = mine
    outs = [torch.empty_like(buf) for _ in range(log.world)]
    dist.all_gather(outs, buf, group=group)
    whole = torch.cat([o[:k] for o, k in zip(outs, sizes)])
    return whole.view(local.dtype).to(local.device)


def broadcast_tensor(t: torch.Tensor | None, src: int, shape: tuple[int, ...], dtype: torch.dtype,
                     group: Any = None) -> torch.Tensor:
    """Tensor ``t`` of group rank ``src`` (``shape``/``dtype`` known on every rank) everywhere."""
    dist = _dist()
    dev = _device(dist, group)
    nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
    buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=dev)
    if t is not None:
        buf[:nbytes] = _as_bytes(t.to(dtype)).to(dev)
    gsrc = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast(buf, gsrc, group=group)
    out = buf[:nbytes].view(dtype).reshape(shape)
    return out.to(t.device) if t is not None else out.cpu()


def all_gather_logs(log: "GradientLog", group: Any = None) -> list["GradientLog"]:
    """Every rank's shard, on every rank, rebuilt from stored bytes (safetensors + JSON)."""
    import json

    from safetensors.torch import load as st_load, save as st_save

    from ._io import describe_part, shard_from_part
    check_group(log, group)
    part, tensors = describe_part(log, all_local=True)
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    head = json.dumps(part).encode("utf-8")
    parts = all_gather_bytes(len(head).to_bytes(8, "little") + head + blob, group)
    out = []
    for r, raw in enumerate(parts):
        k = int.from_bytes(raw[:8], "little")
        p = json.loads(raw[8:8 + k].decode("utf-8"))
        out.append(shard_from_part(log, p, st_load(raw[8 + k:]), r))
    return out
