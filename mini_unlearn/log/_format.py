"""On-disk format of a :class:`~mini_unlearn.log.GradientLog`: constants, dtype names, tensor
layouts, checksums and manifest validation (pure functions; no file writing here).

A log directory holds ``CURRENT`` (naming the live version directory) and ``v-<id>/`` version
directories, each with ``manifest.json`` (JSON, with its own sha256 ``checksum``) and safetensors
tensor files. Format version 1 is a single-process log (files ``tensors-NNNNN.safetensors``);
version 2 is a log saved by N ranks (files ``rank-RRRRR-NNNNN.safetensors``, plus a ``shards``
object naming N, the flat ranges and the alignment). Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Union

import torch

from ..errors import LogFormatError, NonFiniteError
from ..ops import Compressed, decompress

#: Newest version of the on-disk layout this library reads and writes. Single-process saves
#: still write version 1 (unchanged); sharded (multi-rank) saves write version 2.
FORMAT_VERSION = 2
#: Version written by a single-process save (N = 1), identical to the original layout.
SINGLE_VERSION = 1
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "mini_unlearn.GradientLog"
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^v-[0-9A-Za-z_-]+$")
FILE_RE = re.compile(r"^tensors-[0-9]{5}\.safetensors$")
RANK_FILE_RE = re.compile(r"^rank-[0-9]{5}-[0-9]{5}\.safetensors$")
FILE_BYTES = 1 << 30  # start a new safetensors file past this many bytes
FIX = "re-record the log or restore it from a backup"

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

PathLike = Union[str, "os.PathLike[str]"]


def file_name(rank: int | None, i: int) -> str:
    """Name of tensor file ``i`` (``rank=None``: a single-process log)."""
    return f"tensors-{i:05d}.safetensors" if rank is None else f"rank-{rank:05d}-{i:05d}.safetensors"


def dtype_name(dt: torch.dtype) -> str:
    """The manifest name of a storable dtype; TypeError for others."""
    if dt not in DTYPE_NAMES:
        raise TypeError(f"dtype {dt} cannot be stored in a GradientLog "
                        f"(supported: {', '.join(DTYPES)})")
    return DTYPE_NAMES[dt]


def layout(fmt: str, numel: int, block: int) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...] | None]:
    """dtype and shape of ``data`` and the shape of ``scales`` (None: no scales) of one vector."""
    nb = -(-numel // block)
    if fmt == "fp32":
        return torch.float32, (numel,), None
    if fmt == "bf16":
        return torch.bfloat16, (numel,), None
    if fmt == "int8":
        return torch.int8, (numel,), (nb,)
    return torch.uint8, ((numel + 1) // 2,), (nb,)


def check_finite(what: str, t: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if floating tensor ``t`` holds NaN or Inf."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} contains NaN or Inf; refusing to store it in the log "
                             "(check the loss / learning rate that produced it)")


def own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no memory with anything (safetensors refuses shared storage)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its ``checksum`` key."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decompress_to(c: Compressed, dtype: torch.dtype) -> torch.Tensor:
    """``decompress`` for any float dtype (the kernels write fp32/bf16/fp16 only)."""
    if c.scales is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return decompress(c, torch.float32).to(dtype)
    return decompress(c, dtype)


def human(n: float) -> str:
    """Byte count for people: ``1,234 B``, ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def bad(where: str, what: str) -> LogFormatError:
    """A :class:`LogFormatError` naming the file and the fix."""
    return LogFormatError(f"{where}: {what}; {FIX}")


# ---- slicing compressed vectors (shards) -------------------------------------------------------

def slice_compressed(c: Compressed, lo: int, hi: int) -> Compressed:
    """Elements ``[lo, hi)`` of a 1-D :class:`Compressed` as a new (copied) one.

    ``lo`` must be a multiple of the block (and so even, which int4's two-per-byte packing needs);
    ``hi`` a multiple of the block or ``c.numel``: then every quantisation block lies wholly inside
    the slice and the codes and scales split without re-quantising.
    """
    if not (0 <= lo <= hi <= c.numel) or lo % c.block or (hi % c.block and hi != c.numel):
        raise ValueError(f"cannot slice a {c.fmt} vector of {c.numel} elements (block {c.block}) "
                         f"at [{lo}, {hi}): shard boundaries must be multiples of the block")
    if c.fmt == "int4":
        data = c.data[lo // 2:(hi + 1) // 2]
    else:
        data = c.data[lo:hi]
    scales = None if c.scales is None else c.scales[lo // c.block:-(-hi // c.block)]
    return Compressed(c.fmt, own(data), None if scales is None else own(scales), hi - lo, c.block)


def cat_compressed(parts: list[Compressed]) -> Compressed:
    """Concatenate 1-D :class:`Compressed` slices of one format and block (every part but the last
    a whole number of blocks) into one vector; the inverse of :func:`slice_compressed`."""
    f = parts[0]
    for p in parts[:-1]:
        if p.numel % p.block:
            raise ValueError("only the last slice may end inside a quantisation block")
    if any((p.fmt, p.block) != (f.fmt, f.block) for p in parts):
        raise ValueError("slices differ in format or block")
    data = torch.cat([p.data for p in parts])
    scales = None if f.scales is None else torch.cat([p.scales for p in parts])
    return Compressed(f.fmt, data, scales, sum(p.numel for p in parts), f.block)


def shard_range(dim: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """Balanced contiguous slice ``[lo, hi)`` of a flat vector of ``dim`` elements for ``rank`` of
    ``world``: the ``ceil(dim / align)`` aligned chunks are split as evenly as possible (sizes
    differ by at most one chunk), so ``lo`` (and ``hi`` unless it is ``dim``) is a multiple of
    ``align``. Ranges of ranks ``0..world-1`` tile ``[0, dim)`` in order (some may be empty when
    ``dim`` is small)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if align < 1:
        raise ValueError(f"align must be positive, got {align}")
    chunks = -(-dim // align)
    a, b = rank * chunks // world, (rank + 1) * chunks // world
    return min(dim, a * align), min(dim, b * align)


def assign_owners(costs: list[float], world: int) -> list[int]:
    """An owner rank for each item of cost ``costs[i]`` (e.g. a layer's eigendecomposition, cost
    ~ d_in³ + d_out³), balancing the ranks' total cost: largest first, each to the least loaded
    rank (ties: lowest rank). Deterministic, so every rank computes the same assignment; pass the
    result as ``owner=`` to :meth:`GradientLog.put`."""
    if world < 1:
        raise ValueError(f"world must be positive, got {world}")
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners
