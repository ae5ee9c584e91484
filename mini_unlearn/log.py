"""Compressed storage of training history: :class:`GradientLog`.

A log holds, for a chosen, ordered set of model parameters (names, shapes, dtypes):

* **entries** -- named vectors/tensors (anchor weights, anchor gradient, K-FAC eigenvectors,
  spectra, ...), each stored as an :class:`~mini_unlearn.ops.Compressed` in one of the formats
  ``fp32``/``bf16``/``int8``/``int4``, or as a plain tensor (``exact=True``) for small things
  that must stay bit-identical;
* **row lists** -- named lists of history rows (all of one format and length), exposed as
  stacked rows for :func:`~mini_unlearn.ops.rows_dot` / :func:`~mini_unlearn.ops.rows_axpy`;
* **meta** -- a JSON-able dict (n_train, weight decay, lr, loss reduction, modes, ...; the
  format, block and library version are filled in).

On disk a log is a directory written by :meth:`GradientLog.save` and read back, fully
validated, by :meth:`GradientLog.load` (safetensors + JSON only, nothing is unpickled).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LogFormatError, LogMismatchError, NonFiniteError
from .ops import FORMATS, Compressed, compress, decompress, stack_rows

__all__ = ["GradientLog", "FORMAT_VERSION"]

#: Version of the on-disk layout written by :meth:`GradientLog.save`.
FORMAT_VERSION = 1
_FORMAT_NAME = "mini_unlearn.GradientLog"
_CURRENT = "CURRENT"
_MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v-[0-9A-Za-z_-]+$")
_SHARD_RE = re.compile(r"^tensors-[0-9]{5}\.safetensors$")
_SHARD_BYTES = 1 << 30  # start a new safetensors file past this many bytes
_FIX = "re-record the log or restore it from a backup"

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

PathLike = Union[str, "os.PathLike[str]"]


def _dtype_name(dt: torch.dtype) -> str:
    if dt not in _DTYPE_NAMES:
        raise TypeError(f"dtype {dt} cannot be stored in a GradientLog "
                        f"(supported: {', '.join(_DTYPES)})")
    return _DTYPE_NAMES[dt]


def _layout(fmt: str, numel: int, block: int) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...] | None]:
    """dtype and shape of ``data`` and the shape of ``scales`` (None: no scales) of one vector."""
    nb = -(-numel // block)
    if fmt == "fp32":
        return torch.float32, (numel,), None
    if fmt == "bf16":
        return torch.bfloat16, (numel,), None
    if fmt == "int8":
        return torch.int8, (numel,), (nb,)
    return torch.uint8, ((numel + 1) // 2,), (nb,)


def _check_finite(what: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} contains NaN or Inf; refusing to store it in the log "
                             "(check the loss / learning rate that produced it)")


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no memory with anything (safetensors refuses shared storage)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories cannot be opened on Windows
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _decompress(c: Compressed, dtype: torch.dtype) -> torch.Tensor:
    if c.scales is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return decompress(c, torch.float32).to(dtype)  # the kernels write fp32/bf16/fp16 only
    return decompress(c, dtype)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


class _Rows:
    """One named list of history rows (each a 1-D :class:`Compressed`) and their common shape."""

    __slots__ = ("fmt", "numel", "block", "shape", "items")

    def __init__(self, fmt: str, numel: int, block: int, shape: tuple[int, ...]):
        self.fmt, self.numel, self.block, self.shape = fmt, numel, block, shape
        self.items: list[Compressed] = []


class GradientLog:
    """Compressed, minimal training history for a fixed, ordered set of model parameters.

    Build one with :meth:`for_model` (or the constructor), fill it with :meth:`put` and
    :meth:`append_row`, persist it with :meth:`save` and get it back with :meth:`load`.
    Parameters are addressed by name; :meth:`flatten`, :meth:`unflatten` and :meth:`load_into`
    convert between a model and one flat fp32 vector laid out in the log's parameter order
    (:meth:`param_slice` gives each parameter's range).

    Attributes:
        param_names, shapes, dtypes: the logged parameters, in flat-vector order.
        fmt, block: default storage format and quantisation block of :meth:`put`/:meth:`append_row`.
        meta: JSON-able dict saved with the log; ``format``, ``block`` and
            ``mini_unlearn_version`` are filled in, anything else is the caller's.
        all_trainable: True when the log covers all trainable parameters of its model (then
            :meth:`check_model` also rejects trainable parameters the log does not know).
    """

    def __init__(self, param_names: Iterable[str], shapes: Iterable[Iterable[int]],
                 dtypes: Iterable[torch.dtype], fmt: str = "int8", block: int = 256,
                 meta: Mapping[str, Any] | None = None, *, all_trainable: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if not isinstance(block, int) or block < 32 or block > 4096 or block & (block - 1):
            raise ValueError(f"block must be a power of two in [32, 4096], got {block!r}")
        self.param_names: list[str] = [str(n) for n in param_names]
        self.shapes: list[tuple[int, ...]] = [tuple(int(s) for s in sh) for sh in shapes]
        self.dtypes: list[torch.dtype] = list(dtypes)
        if not (len(self.param_names) == len(self.shapes) == len(self.dtypes)):
            raise ValueError("param_names, shapes and dtypes must have the same length")
        if len(set(self.param_names)) != len(self.param_names):
            raise ValueError("parameter names must be unique")
        for dt in self.dtypes:
            _dtype_name(dt)
        self.fmt = fmt
        self.block = block
        self.all_trainable = bool(all_trainable)
        from . import __version__
        self.meta: dict[str, Any] = {"format": fmt, "block": block, "mini_unlearn_version": __version__}
        self.meta.update(dict(meta or {}))
        self._entries: dict[str, Compressed | torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._rows: dict[str, _Rows] = {}
        self._offsets: dict[str, slice] = {}
        off = 0
        for name, sh in zip(self.param_names, self.shapes):
            n = math.prod(sh)
            self._offsets[name] = slice(off, off + n)
            off += n
        self.dim: int = off  #: total number of logged parameter elements

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: torch.nn.Module, params: Iterable[str] | None = None, *,
                  fmt: str = "int8", block: int = 256,
                  meta: Mapping[str, Any] | None = None) -> "GradientLog":
        """A log for ``model``'s parameters: ``params=None`` takes every trainable parameter (in
        ``named_parameters`` order), else the named ones in the given order."""
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            everything = True
        else:
            names = list(params)
            missing = [n for n in names if n not in named]
            if missing:
                raise KeyError(f"model has no parameter {missing[0]!r} "
                               f"(it has: {', '.join(list(named)[:10])}{', ...' if len(named) > 10 else ''})")
            everything = False
        return cls(names, [named[n].shape for n in names], [named[n].dtype for n in names],
                   fmt=fmt, block=block, meta=meta, all_trainable=everything)

    # ---- parameters <-> flat vector ----------------------------------------------------------

    def param_slice(self, name: str) -> slice:
        """Range of parameter ``name`` in the flat vector."""
        return self._offsets[name]

    def _tensors_of(self, obj: Any, grads: bool) -> list[torch.Tensor]:
        if isinstance(obj, torch.nn.Module):
            self.check_model(obj)
            named = dict(obj.named_parameters())
            ts = [named[n] for n in self.param_names]
            if grads:
                ts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ts]
            return ts
        if grads:
            raise TypeError("grads=True needs a model")
        if isinstance(obj, Mapping):
            missing = [n for n in self.param_names if n not in obj]
            if missing:
                raise LogMismatchError(f"no tensor for logged parameter {missing[0]!r}")
            ts = [obj[n] for n in self.param_names]
        else:
            ts = list(obj)
            if len(ts) != len(self.param_names):
                raise LogMismatchError(f"got {len(ts)} tensors for {len(self.param_names)} logged parameters")
        for n, t, sh in zip(self.param_names, ts, self.shapes):
            if tuple(t.shape) != sh:
                raise LogMismatchError(f"parameter {n!r}: shape {tuple(t.shape)} given, {sh} in the log")
        return ts

    def flatten(self, model_or_tensors: torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
                *, grads: bool = False) -> torch.Tensor:
        """The logged parameters as one 1-D fp32 vector (a detached copy), in log order.

        Accepts a model (checked with :meth:`check_model`), a dict name -> tensor, or a sequence
        of tensors in log order. ``grads=True`` (models only) flattens ``p.grad`` instead
        (zeros where a gradient is missing).
        """
        ts = self._tensors_of(model_or_tensors, grads)
        if not ts:
            return torch.zeros(0)
        return torch.cat([t.detach().reshape(-1).float() for t in ts])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{name: tensor}`` with each parameter's shape and dtype
        (views of ``vec`` where the dtype already matches)."""
        if vec.dim() != 1 or vec.numel() != self.dim:
            raise ValueError(f"expected a 1-D vector of {self.dim} elements, got shape {tuple(vec.shape)}")
        return {n: vec[self._offsets[n]].reshape(sh).to(dt)
                for n, sh, dt in zip(self.param_names, self.shapes, self.dtypes)}

    def load_into(self, model: torch.nn.Module, vec: torch.Tensor) -> torch.nn.Module:
        """Write a flat vector into ``model``'s logged parameters, in place; returns ``model``."""
        self.check_model(model)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in self.unflatten(vec).items():
                named[n].copy_(t)
        return model

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`LogMismatchError` naming the first parameter that differs between the log
        and ``model``: missing from the model, of another shape or dtype, or (when the log covers
        all trainable parameters) a trainable model parameter the log does not know."""
        named = dict(model.named_parameters())
        fix = "use the model this log was recorded for, or re-record the log"
        for n, sh, dt in zip(self.param_names, self.shapes, self.dtypes):
            if n not in named:
                raise LogMismatchError(f"logged parameter {n!r} is missing from the model; {fix}")
            p = named[n]
            if tuple(p.shape) != sh:
                raise LogMismatchError(f"parameter {n!r}: shape {tuple(p.shape)} in the model, "
                                       f"{sh} in the log; {fix}")
            if p.dtype != dt:
                raise LogMismatchError(f"parameter {n!r}: dtype {p.dtype} in the model, {dt} in the log; {fix}")
        if self.all_trainable:
            known = set(self.param_names)
            for n, p in named.items():
                if p.requires_grad and n not in known:
                    raise LogMismatchError(f"model parameter {n!r} (trainable) is not in the log; {fix}")

    # ---- entries -----------------------------------------------------------------------------

    @property
    def entry_names(self) -> list[str]:
        """Names of the stored entries, in insertion order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def put(self, name: str, tensor: torch.Tensor | Compressed, fmt: str | None = None,
            exact: bool = False) -> None:
        """Store (or replace) entry ``name``.

        A tensor is compressed into ``fmt`` (default: the log's format and block) and its shape is
        kept; ``exact=True`` stores a copy of the tensor as it is (any dtype, bit-identical). An
        already :class:`Compressed` 1-D vector is stored as given (copied). Raises
        :class:`NonFiniteError` for NaN/Inf.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("entry names must be non-empty strings")
        what = f"log entry {name!r}"
        if isinstance(tensor, Compressed):
            if exact or fmt is not None:
                raise ValueError("fmt/exact apply to tensors, not to an already Compressed value")
            c = self._own_compressed(tensor, what)
            self._entries[name], self._shapes[name] = c, (c.numel,)
            return
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}: expected a tensor or Compressed, got {type(tensor).__name__}")
        if exact:
            _check_finite(what, tensor)
            _dtype_name(tensor.dtype)
            self._entries[name], self._shapes[name] = _own(tensor), tuple(tensor.shape)
            return
        c = self._compress(tensor, fmt or self.fmt, self.block, what)
        self._entries[name], self._shapes[name] = c, tuple(tensor.shape)

    @staticmethod
    def _compress(tensor: torch.Tensor, fmt: str, block: int, what: str) -> Compressed:
        if not tensor.is_floating_point():
            tensor = tensor.float()
        c = compress(tensor, fmt, block=block)
        # int8/int4 blocks holding NaN/Inf get a NaN scale: checking the scales is enough
        _check_finite(what, c.data if c.scales is None else c.scales)
        return c

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Entry ``name`` with its original shape: decompressed to ``dtype`` (default fp32) for
        compressed entries, the stored tensor (cast to ``dtype`` if given) for exact ones. Always
        a fresh tensor, safe to modify."""
        if name not in self._entries:
            raise KeyError(f"no entry {name!r} in the log (entries: {', '.join(self._entries) or 'none'})")
        e = self._entries[name]
        if isinstance(e, Compressed):
            out = _decompress(e, dtype or torch.float32)
            src = e.data
        else:
            out = e if dtype is None else e.to(dtype)
            src = e
        if out.data_ptr() == src.data_ptr() and out.numel():
            out = out.clone()
        return out.reshape(self._shapes[name])

    def raw(self, name: str) -> Compressed | torch.Tensor:
        """The stored object of entry ``name`` (a 1-D :class:`Compressed`, or the exact tensor);
        shared with the log: read it, do not modify it."""
        return self._entries[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Original shape of entry ``name`` (or of each row of row list ``name``)."""
        if name in self._entries:
            return self._shapes[name]
        return self._rows[name].shape

    def _own_compressed(self, c: Compressed, what: str) -> Compressed:
        if c.fmt not in FORMATS:
            raise ValueError(f"{what}: unknown format {c.fmt!r}")
        if c.data.dim() != 1:
            raise ValueError(f"{what}: expected one compressed vector, got {c.rows} rows")
        dt, dshape, sshape = _layout(c.fmt, c.numel, c.block)
        if c.data.dtype != dt or tuple(c.data.shape) != dshape or (
                (c.scales is None) != (sshape is None)) or (
                sshape is not None and tuple(c.scales.shape) != sshape):
            raise ValueError(f"{what}: Compressed data/scales do not match format {c.fmt} "
                             f"with {c.numel} elements and block {c.block}")
        _check_finite(what, c.data)
        if c.scales is not None:
            _check_finite(what, c.scales)
        return Compressed(c.fmt, _own(c.data), None if c.scales is None else _own(c.scales),
                          c.numel, c.block)

    # ---- row lists ---------------------------------------------------------------------------

    @property
    def row_lists(self) -> list[str]:
        """Names of the row lists, in creation order."""
        return list(self._rows)

    def append_row(self, list_name: str, tensor: torch.Tensor | Compressed, fmt: str | None = None) -> int:
        """Append one row to list ``list_name`` (created on first use with ``fmt``, default the
        log's format, and the row's shape; later rows must match both). Returns the row's index.
        Raises :class:`NonFiniteError` for NaN/Inf."""
        if not isinstance(list_name, str) or not list_name:
            raise ValueError("row list names must be non-empty strings")
        rl = self._rows.get(list_name)
        k = 0 if rl is None else len(rl.items)
        what = f"row {k} of log row list {list_name!r}"
        if isinstance(tensor, Compressed):
            c = self._own_compressed(tensor, what)
            shape = (c.numel,) if rl is None else rl.shape
        else:
            use = fmt or (rl.fmt if rl is not None else self.fmt)
            shape = tuple(tensor.shape)
            c = self._compress(tensor, use, self.block if rl is None else rl.block, what)
        if rl is None:
            rl = self._rows[list_name] = _Rows(c.fmt, c.numel, c.block, shape)
        elif (c.fmt, c.numel, c.block) != (rl.fmt, rl.numel, rl.block) or (
                not isinstance(tensor, Compressed) and shape != rl.shape):
            raise ValueError(f"{what}: format {c.fmt}/shape {shape} differs from the list's "
                             f"{rl.fmt}/{rl.shape}")
        rl.items.append(c)
        return k

    def num_rows(self, list_name: str) -> int:
        """Number of rows in list ``list_name`` (0 if it does not exist)."""
        rl = self._rows.get(list_name)
        return 0 if rl is None else len(rl.items)

    def rows(self, list_name: str, start: int = 0, stop: int | None = None) -> Compressed:
        """Rows ``start:stop`` of list ``list_name`` stacked into one 2-D :class:`Compressed`
        (a copy; build it once and reuse it) for :func:`ops.rows_dot` / :func:`ops.rows_axpy`."""
        if list_name not in self._rows:
            raise KeyError(f"no row list {list_name!r} in the log (lists: {', '.join(self._rows) or 'none'})")
        items = self._rows[list_name].items[start:stop]
        if not items:
            raise IndexError(f"row list {list_name!r}: no rows in [{start}:{stop}]")
        return stack_rows(items)

    def row(self, list_name: str, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Row ``i`` of list ``list_name``, decompressed to ``dtype`` with its original shape."""
        rl = self._rows[list_name]
        c = rl.items[i]
        out = _decompress(c, dtype)
        if out.data_ptr() == c.data.data_ptr() and out.numel():
            out = out.clone()
        return out.reshape(rl.shape)

    # ---- device ------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> "GradientLog":
        """Move every stored tensor to ``device`` (in place); returns ``self``."""
        def mv(c: Compressed) -> Compressed:
            return Compressed(c.fmt, c.data.to(device), None if c.scales is None else c.scales.to(device),
                              c.numel, c.block)
        for n, e in self._entries.items():
            self._entries[n] = mv(e) if isinstance(e, Compressed) else e.to(device)
        for rl in self._rows.values():
            rl.items = [mv(c) for c in rl.items]
        return self

    # ---- sizes -------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales and exact tensors of every entry and row."""
        n = 0
        for e in self._entries.values():
            n += e.nbytes() if isinstance(e, Compressed) else e.numel() * e.element_size()
        for rl in self._rows.values():
            n += sum(c.nbytes() for c in rl.items)
        return n

    def raw_nbytes(self) -> int:
        """Bytes the same data takes uncompressed: 4 per element of compressed entries and rows
        (fp32), the real size of exact entries."""
        n = 0
        for e in self._entries.values():
            n += 4 * e.numel if isinstance(e, Compressed) else e.numel() * e.element_size()
        for rl in self._rows.values():
            n += 4 * rl.numel * len(rl.items)
        return n

    def compression_ratio(self) -> float:
        """``raw_nbytes() / nbytes()`` (1.0 for an empty log)."""
        n = self.nbytes()
        return self.raw_nbytes() / n if n else 1.0

    def __repr__(self) -> str:
        nrows = sum(len(r.items) for r in self._rows.values())
        return (f"GradientLog(params={len(self.param_names)}, dim={self.dim}, fmt={self.fmt!r}, "
                f"block={self.block}, entries={len(self._entries)}, row_lists={len(self._rows)} "
                f"({nrows} rows), nbytes={self.nbytes()}, ratio={self.compression_ratio():.2f}x)")

    def summary(self, max_params: int = 40) -> str:
        """Multi-line human-readable description: parameters, entries (format, shape, bytes), row
        lists, meta, sizes and compression ratio."""
        lines = [f"GradientLog: {len(self.param_names)} parameters, {self.dim:,} elements, "
                 f"default format {self.fmt} (block {self.block})"]
        lines.append("parameters:")
        w = max((len(n) for n in self.param_names[:max_params]), default=0)
        for n, sh, dt in list(zip(self.param_names, self.shapes, self.dtypes))[:max_params]:
            lines.append(f"  {n:<{w}}  {tuple(sh)}  {_dtype_name(dt)}")
        if len(self.param_names) > max_params:
            lines.append(f"  ... {len(self.param_names) - max_params} more")
        lines.append(f"entries ({len(self._entries)}):")
        w = max((len(n) for n in self._entries), default=0)
        rows = []
        for n, e in self._entries.items():
            if isinstance(e, Compressed):
                rows.append((n, e.fmt, e.nbytes()))
            else:
                rows.append((n, f"exact {_dtype_name(e.dtype)}", e.numel() * e.element_size()))
        wf = max((len(r[1]) for r in rows), default=0)
        for n, fmt, b in rows:
            lines.append(f"  {n:<{w}}  {fmt:<{wf}}  shape {self._shapes[n]}  {_human(b)}")
        lines.append(f"row lists ({len(self._rows)}):")
        w = max((len(n) for n in self._rows), default=0)
        for n, rl in self._rows.items():
            b = sum(c.nbytes() for c in rl.items)
            lines.append(f"  {n:<{w}}  {rl.fmt:<6}  {len(rl.items)} rows x {rl.shape}  {_human(b)}")
        lines.append("meta:")
        for k, v in self.meta.items():
            lines.append(f"  {k}: {json.dumps(v, default=str)}")
        lines.append(f"size: {_human(self.nbytes())} stored ({self.nbytes():,} bytes), "
                     f"{_human(self.raw_nbytes())} as fp32; compression ratio "
                     f"{self.compression_ratio():.2f}x")
        return "\n".join(lines)

    # ---- saving ------------------------------------------------------------------------------

    def _manifest_body(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for n, e in self._entries.items():
            if isinstance(e, Compressed):
                dt, _, sshape = _layout(e.fmt, e.numel, e.block)
                entries[n] = {"kind": "compressed", "fmt": e.fmt, "numel": e.numel, "block": e.block,
                              "shape": list(self._shapes[n]), "data_dtype": _dtype_name(dt),
                              "scales_dtype": None if sshape is None else "float32"}
                tensors[f"entry/{n}/data"] = e.data
                if e.scales is not None:
                    tensors[f"entry/{n}/scales"] = e.scales
            else:
                entries[n] = {"kind": "exact", "dtype": _dtype_name(e.dtype), "numel": e.numel(),
                              "shape": list(e.shape)}
                tensors[f"entry/{n}/data"] = e
        rows: dict[str, Any] = {}
        for n, rl in self._rows.items():
            dt, _, sshape = _layout(rl.fmt, rl.numel, rl.block)
            rows[n] = {"fmt": rl.fmt, "numel": rl.numel, "block": rl.block, "shape": list(rl.shape),
                       "count": len(rl.items), "data_dtype": _dtype_name(dt),
                       "scales_dtype": None if sshape is None else "float32"}
            for i, c in enumerate(rl.items):
                tensors[f"rows/{n}/{i}/data"] = c.data
                if c.scales is not None:
                    tensors[f"rows/{n}/{i}/scales"] = c.scales
        meta = dict(self.meta)
        meta.update(format=self.fmt, block=self.block)
        for k, v in meta.items():
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"log.meta[{k!r}] = {v!r} is not JSON-able ({exc}); store plain "
                                "numbers, strings, lists or dicts") from None
        from . import __version__
        body = {
            "format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
            "written_by": f"mini_unlearn {__version__}",
            "fmt": self.fmt, "block": self.block,
            "params": {"names": self.param_names, "shapes": [list(s) for s in self.shapes],
                       "dtypes": [_dtype_name(d) for d in self.dtypes],
                       "all_trainable": self.all_trainable},
            "entries": entries, "rows": rows, "meta": meta,
        }
        return body, tensors

    def save(self, path: PathLike) -> None:
        """Write the log to directory ``path``, atomically and crash-safely.

        Layout::

            path/CURRENT                     one line: the name of the live version directory
            path/v-<id>/manifest.json        params, entries, row lists, meta, files, checksums
            path/v-<id>/tensors-00000.safetensors  (more files past 1 GiB)

        Protocol: the new version is written into a fresh ``path/v-<id>/`` (tensor files, then the
        manifest; every file and the directory fsynced), then ``CURRENT`` is replaced atomically
        (written to a temp file, fsynced, ``os.replace``d, directory fsynced), and only then are
        older version directories and stray temp files removed. A crash or SIGKILL at any point
        therefore leaves ``CURRENT`` naming either the old or the new complete version; leftovers
        of an interrupted save are cleaned up by the next save. Only a crash during the very
        first save into a new ``path`` leaves no loadable log (there was none before). One writer
        at a time per ``path``; readers may run concurrently. ``path`` must be absent, an existing
        log directory, or an empty directory.
        """
        path = os.fspath(path)
        body, tensors = self._manifest_body()
        if os.path.lexists(path) and not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a log directory; choose another path")
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, _CURRENT)):
            foreign = [f for f in os.listdir(path)
                       if not (_VERSION_RE.match(f) or f.startswith(_CURRENT + ".tmp-"))]
            if foreign:
                raise FileExistsError(f"{path} is a non-empty directory that is not a GradientLog "
                                      f"(it holds {foreign[0]!r}); refusing to overwrite it")
        if not os.path.isdir(path):
            os.makedirs(path)
            _fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)

        vname = f"v-{time.time_ns():x}-{secrets.token_hex(4)}"
        vdir = os.path.join(path, vname)
        os.mkdir(vdir)
        # tensor files, sharded by size
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, t in tensors.items():
            b = t.numel() * t.element_size()
            if shards[-1] and size + b > _SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][k] = t.detach().cpu().contiguous()
            size += b
        files = []
        for i, shard in enumerate(shards):
            if not shard and i > 0:
                continue
            fname = f"tensors-{i:05d}.safetensors"
            fpath = os.path.join(vdir, fname)
            save_file(shard, fpath)
            _fsync_path(fpath)
            files.append({"name": fname, "bytes": os.path.getsize(fpath), "sha256": _sha256(fpath),
                          "tensors": len(shard)})
        body["files"] = files
        body["checksum"] = _manifest_checksum(body)
        mpath = os.path.join(vdir, _MANIFEST)
        with open(mpath, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(vdir, directory=True)
        _fsync_path(path, directory=True)
        # swap the pointer
        tmp = os.path.join(path, f"{_CURRENT}.tmp-{secrets.token_hex(4)}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(vname + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, _CURRENT))
        _fsync_path(path, directory=True)
        # clean up older versions and leftovers of interrupted saves
        for f in os.listdir(path):
            p = os.path.join(path, f)
            if f != vname and _VERSION_RE.match(f) and os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif f.startswith(_CURRENT + ".tmp-"):
                try:
                    os.remove(p)
                except OSError:
                    pass

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike, model: torch.nn.Module | None = None) -> "GradientLog":
        """Read a log written by :meth:`save`, validating everything; never unpickles.

        ``path`` is the log directory (or one of its ``v-<id>`` version directories). Checks the
        manifest (JSON, required keys, format version, its own checksum), that every tensor file
        is present with the recorded byte size and sha256, and every tensor's dtype and shape.
        Raises :class:`FileNotFoundError` if ``path`` does not exist, :class:`LogFormatError` for
        anything truncated, corrupted, missing, of another version or not a log, and (when
        ``model`` is given) :class:`LogMismatchError` via :meth:`check_model`.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such log (no file or directory)")
        if not os.path.isdir(path):
            raise LogFormatError(f"{path}: not a GradientLog (a log is a directory written by "
                                 "GradientLog.save)")
        cur = os.path.join(path, _CURRENT)
        if not os.path.exists(cur):
            if os.path.exists(os.path.join(path, _MANIFEST)):
                log = cls._load_version(path)
            elif any(_VERSION_RE.match(f) for f in os.listdir(path)):
                raise LogFormatError(f"{path}: holds no complete log (its first save was interrupted, "
                                     f"{_CURRENT} is missing); {_FIX}")
            else:
                raise LogFormatError(f"{path}: not a GradientLog (no {_CURRENT} or {_MANIFEST} in it)")
        else:
            for attempt in range(3):  # a concurrent save may swap CURRENT and remove our version
                vname = cls._read_current(cur)
                try:
                    log = cls._load_version(os.path.join(path, vname))
                    break
                except LogFormatError:
                    if attempt == 2 or cls._read_current(cur) == vname:
                        raise
        if model is not None:
            log.check_model(model)
        return log

    @staticmethod
    def _read_current(cur: str) -> str:
        try:
            with open(cur, "rb") as f:
                raw = f.read(4096)
            vname = raw.decode("ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise LogFormatError(f"{cur}: unreadable ({exc}); {_FIX}") from None
        if not _VERSION_RE.match(vname):
            raise LogFormatError(f"{cur}: does not name a log version (corrupted); {_FIX}")
        return vname

    @classmethod
    def _load_version(cls, vdir: str) -> "GradientLog":
        mpath = os.path.join(vdir, _MANIFEST)

        def bad(where: str, what: str) -> LogFormatError:
            return LogFormatError(f"{where}: {what}; {_FIX}")

        if not os.path.isfile(mpath):
            raise bad(vdir, f"{_MANIFEST} is missing")
        try:
            with open(mpath, "rb") as f:
                m = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise bad(mpath, f"not valid JSON ({exc})") from None
        if not isinstance(m, dict) or m.get("format") != _FORMAT_NAME:
            raise LogFormatError(f"{mpath}: not a GradientLog manifest")
        ver = m.get("format_version")
        if ver != FORMAT_VERSION:
            from . import __version__
            hint = ("upgrade mini_unlearn" if isinstance(ver, int) and ver > FORMAT_VERSION
                    else "re-record the log")
            raise LogFormatError(f"{mpath}: log format version {ver!r}, this mini_unlearn "
                                 f"({__version__}) reads version {FORMAT_VERSION}; {hint}")
        required = ("fmt", "block", "params", "entries", "rows", "meta", "files", "checksum")
        missing = [k for k in required if k not in m]
        if missing:
            raise bad(mpath, f"manifest lacks {missing[0]!r}")
        try:
            ok = _manifest_checksum(m) == m["checksum"]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(mpath, "manifest checksum mismatch (corrupted)")

        try:
            return cls._from_manifest(vdir, m)
        except LogFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise bad(mpath, f"malformed manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_manifest(cls, vdir: str, m: dict[str, Any]) -> "GradientLog":
        mpath = os.path.join(vdir, _MANIFEST)

        def bad(where: str, what: str) -> LogFormatError:
            return LogFormatError(f"{where}: {what}; {_FIX}")

        # tensor files: presence, size, checksum, parse
        tensors: dict[str, torch.Tensor] = {}
        for fd in m["files"]:
            fname = fd["name"]
            if not isinstance(fname, str) or not _SHARD_RE.match(fname):
                raise bad(mpath, f"bad tensor file name {fname!r}")
            fpath = os.path.join(vdir, fname)
            if not os.path.isfile(fpath):
                raise bad(fpath, "tensor file is missing")
            size = os.path.getsize(fpath)
            if size != fd["bytes"]:
                raise bad(fpath, f"{size} bytes on disk, {fd['bytes']} recorded (truncated or altered)")
            if _sha256(fpath) != fd["sha256"]:
                raise bad(fpath, "sha256 checksum mismatch (corrupted)")
            try:
                part = load_file(fpath)
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise bad(fpath, f"unreadable safetensors file ({exc})") from None
            for k in part:
                if k in tensors:
                    raise bad(fpath, f"tensor {k!r} appears twice")
            tensors.update(part)
        used: set[str] = set()

        def take(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in tensors:
                raise bad(vdir, f"tensor {key!r} is missing from the tensor files")
            t = tensors[key]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise bad(vdir, f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, the manifest says "
                                f"{dtype} {tuple(shape)}")
            used.add(key)
            return t

        def compressed(prefix: str, d: Mapping[str, Any], what: str) -> Compressed:
            fmt, numel, block = d["fmt"], d["numel"], d["block"]
            if fmt not in FORMATS or not isinstance(numel, int) or numel < 0 or \
                    not isinstance(block, int) or block <= 0:
                raise bad(mpath, f"{what}: bad fmt/numel/block")
            dt, dshape, sshape = _layout(fmt, numel, block)
            data = take(f"{prefix}/data", dt, dshape)
            scales = None if sshape is None else take(f"{prefix}/scales", torch.float32, sshape)
            return Compressed(fmt, data, scales, numel, block)

        def shape_of(d: Mapping[str, Any], numel: int, what: str) -> tuple[int, ...]:
            sh = tuple(d["shape"])
            if not all(isinstance(s, int) and s >= 0 for s in sh) or math.prod(sh) != numel:
                raise bad(mpath, f"{what}: shape {list(sh)} does not hold {numel} elements")
            return sh

        p = m["params"]
        dtypes = []
        for s in p["dtypes"]:
            if s not in _DTYPES:
                raise bad(mpath, f"unknown parameter dtype {s!r}")
            dtypes.append(_DTYPES[s])
        fmt, block = m["fmt"], m["block"]
        if fmt not in FORMATS or not isinstance(block, int) or block <= 0:
            raise bad(mpath, "bad default fmt/block")
        log = cls(p["names"], p["shapes"], dtypes, fmt=fmt, block=block,
                  all_trainable=bool(p.get("all_trainable", False)))
        if not isinstance(m["meta"], dict):
            raise bad(mpath, "meta is not an object")
        log.meta = dict(m["meta"])

        for n, d in m["entries"].items():
            what = f"entry {n!r}"
            if d["kind"] == "compressed":
                c = compressed(f"entry/{n}", d, what)
                log._entries[n], log._shapes[n] = c, shape_of(d, c.numel, what)
            elif d["kind"] == "exact":
                if d["dtype"] not in _DTYPES:
                    raise bad(mpath, f"{what}: unknown dtype {d['dtype']!r}")
                sh = shape_of(d, d["numel"], what)
                log._entries[n] = take(f"entry/{n}/data", _DTYPES[d["dtype"]], sh)
                log._shapes[n] = sh
            else:
                raise bad(mpath, f"{what}: unknown kind {d['kind']!r}")
        for n, d in m["rows"].items():
            what = f"row list {n!r}"
            count = d["count"]
            if not isinstance(count, int) or count < 1:
                raise bad(mpath, f"{what}: bad row count {count!r}")
            rl = _Rows(d["fmt"], d["numel"], d["block"], ())
            rl.items = [compressed(f"rows/{n}/{i}", d, f"{what} row {i}") for i in range(count)]
            rl.shape = shape_of(d, rl.numel, what)
            log._rows[n] = rl
        extra = set(tensors) - used
        if extra:
            raise bad(vdir, f"unexpected tensor {sorted(extra)[0]!r} not described by the manifest")
        return log
