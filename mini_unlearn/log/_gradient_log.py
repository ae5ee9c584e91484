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

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch

from ..errors import LogMismatchError
from ..ops import FORMATS, Compressed, compress, stack_rows
from ._format import (DTYPES as _DTYPES, PathLike, check_finite as _check_finite,
                      decompress_to as _decompress, dtype_name as _dtype_name, human as _human,
                      layout as _layout, own as _own, shard_range, slice_compressed,
                      cat_compressed)

__all__ = ["GradientLog"]

#: where an entry or row list lives in a sharded log: "flat" (every rank holds its slice of the
#: flat vector), "replicated" (every rank holds all of it) or an int (that rank owns it whole)
Placement = Union[str, int]


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
        from .. import __version__
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
        # sharding (see :meth:`shard_of`): a full log is rank 0 of 1 covering [0, dim)
        self.rank: int = 0  #: this shard's rank (0 for a full log)
        self.world: int = 1  #: number of shards the flat vectors are split into (1: a full log)
        self.align: int = block  #: shard boundaries are multiples of this (a quantisation block)
        self.lo: int = 0  #: start of this shard's range of every flat vector
        self.hi: int = off  #: end (exclusive) of this shard's range
        self._eplace: dict[str, Placement] = {}
        self._rplace: dict[str, Placement] = {}
        # entries of a shard owned whole by another rank: name -> (owner, shape, dtype name or
        # None for compressed entries, which decompress to fp32)
        self._remote: dict[str, tuple[int, tuple[int, ...], str | None]] = {}
        self._order: dict[str, None] = {}  # every entry name, local or remote, in insertion order

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
            exact: bool = False, *, placement: str | None = None, owner: int | None = None) -> None:
        """Store (or replace) entry ``name``.

        A tensor is compressed into ``fmt`` (default: the log's format and block) and its shape is
        kept; ``exact=True`` stores a copy of the tensor as it is (any dtype, bit-identical). An
        already :class:`Compressed` 1-D vector is stored as given (copied). Raises
        :class:`NonFiniteError` for NaN/Inf.

        Placement (what a shard holds, see :meth:`shard_of`): ``placement="flat"`` splits a 1-D
        vector of :attr:`dim` elements across the shards (the default for such vectors);
        ``"replicated"`` keeps the entry whole on every shard (the default for anything else);
        ``owner=r`` makes rank ``r`` its only holder (e.g. one layer's K-FAC factors). On a shard,
        a flat entry may be given whole (``dim`` elements; the shard keeps its slice, compressing
        only that) or as this shard's slice (``hi - lo`` elements, with ``placement="flat"``), and
        an entry owned by another rank is not stored (only its shape is remembered).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("entry names must be non-empty strings")
        what = f"log entry {name!r}"
        if isinstance(tensor, Compressed):
            if exact or fmt is not None:
                raise ValueError("fmt/exact apply to tensors, not to an already Compressed value")
        elif not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}: expected a tensor or Compressed, got {type(tensor).__name__}")
        shape = (tensor.numel,) if isinstance(tensor, Compressed) else tuple(tensor.shape)
        place = self._placement_for(what, shape, placement, owner)
        if place == "flat":
            tensor, shape = self._local_part(what, tensor, exact), (self.dim,)
        elif isinstance(place, int) and place != self.rank and self.world > 1:
            dt = None if not exact or isinstance(tensor, Compressed) else _dtype_name(tensor.dtype)
            self._entries.pop(name, None)
            self._shapes.pop(name, None)
            self._eplace.pop(name, None)
            self._remote[name] = (place, shape, dt)
            self._order[name] = None
            return
        if isinstance(tensor, Compressed):
            c = self._own_compressed(tensor, what)
            self._store(name, c, shape, place)
            return
        if exact:
            _check_finite(what, tensor)
            _dtype_name(tensor.dtype)
            self._store(name, _own(tensor), shape, place)
            return
        self._store(name, self._compress(tensor, fmt or self.fmt, self.block, what), shape, place)

    def _store(self, name: str, value: Compressed | torch.Tensor, shape: tuple[int, ...],
               place: Placement) -> None:
        self._remote.pop(name, None)
        self._order[name] = None
        self._entries[name], self._shapes[name], self._eplace[name] = value, shape, place

    def _placement_for(self, what: str, shape: tuple[int, ...], placement: str | None,
                       owner: int | None) -> Placement:
        if owner is not None:
            if placement not in (None, "owned"):
                raise ValueError(f"{what}: give either placement or owner, not both")
            if not isinstance(owner, int) or owner < 0 or (self.world > 1 and owner >= self.world):
                raise ValueError(f"{what}: owner must be a rank in [0, {self.world}), got {owner!r}")
            return owner
        local = (self.hi - self.lo,)
        if placement is None:
            return "flat" if shape == (self.dim,) and self.dim > 0 else "replicated"
        if placement == "replicated":
            return placement
        if placement == "flat":
            if shape not in ((self.dim,), local):
                raise ValueError(f"{what}: a flat entry is a 1-D vector of {self.dim} elements "
                                 f"(or this shard's {local[0]}), got shape {shape}")
            return placement
        raise ValueError(f"{what}: placement must be 'flat' or 'replicated' (or give owner=), "
                         f"got {placement!r}")

    def _local_part(self, what: str, t: torch.Tensor | Compressed, exact: bool) -> torch.Tensor | Compressed:
        """This shard's slice of a flat vector given whole (or ``t`` if it is the slice already)."""
        n = t.numel if isinstance(t, Compressed) else t.numel()
        if self.world == 1 or n != self.dim or (self.lo, self.hi) == (0, self.dim):
            return t if isinstance(t, Compressed) else t.reshape(-1)
        if isinstance(t, Compressed):
            if self.align % t.block:
                raise ValueError(f"{what}: block {t.block} does not divide the shard alignment "
                                 f"{self.align}")
            return slice_compressed(t, self.lo, self.hi)
        return t.reshape(-1)[self.lo:self.hi]

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
            self._missing(name)
        e = self._entries[name]
        if isinstance(e, Compressed):
            out = _decompress(e, dtype or torch.float32)
            src = e.data
        else:
            out = e if dtype is None else e.to(dtype)
            src = e
        if out.data_ptr() == src.data_ptr() and out.numel():
            out = out.clone()
        return out.reshape(self._local_shape(name))

    def raw(self, name: str) -> Compressed | torch.Tensor:
        """The stored object of entry ``name`` (a 1-D :class:`Compressed`, or the exact tensor);
        shared with the log: read it, do not modify it."""
        return self._entries[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Original shape of entry ``name`` (or of each row of row list ``name``); for a flat
        entry of a shard the full ``(dim,)``, not the slice (see :meth:`local_shape`)."""
        if name in self._entries:
            return self._shapes[name]
        if name in self._remote:
            return self._remote[name][1]
        return self._rows[name].shape

    def local_shape(self, name: str) -> tuple[int, ...]:
        """Shape of what :meth:`get` / :meth:`row` return here: ``(hi - lo,)`` for flat entries
        and rows of a shard, else :meth:`shape_of`."""
        return self._local_shape(name)

    def _local_shape(self, name: str) -> tuple[int, ...]:
        flat = (self._eplace.get(name) if name in self._entries else self._rplace.get(name)) == "flat"
        if flat and self.world > 1:
            return (self.hi - self.lo,)
        return self.shape_of(name)

    def _missing(self, name: str) -> None:
        if name in self._remote:
            raise KeyError(f"entry {name!r} is owned by rank {self._remote[name][0]}, not by this "
                           f"shard (rank {self.rank} of {self.world}); use full({name!r}) to fetch it")
        raise KeyError(f"no entry {name!r} in the log (entries: {', '.join(self._entries) or 'none'})")

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

    def append_row(self, list_name: str, tensor: torch.Tensor | Compressed, fmt: str | None = None,
                   *, placement: str | None = None) -> int:
        """Append one row to list ``list_name`` (created on first use with ``fmt``, default the
        log's format, and the row's shape; later rows must match both). Returns the row's index.
        Raises :class:`NonFiniteError` for NaN/Inf.

        Rows of :attr:`dim` elements are flat (split across shards) by default, others replicated;
        ``placement`` ("flat"/"replicated") chooses on the first row. On a shard a flat row may be
        given whole (only this shard's slice is compressed and kept) or as the slice itself.
        """
        if not isinstance(list_name, str) or not list_name:
            raise ValueError("row list names must be non-empty strings")
        rl = self._rows.get(list_name)
        k = 0 if rl is None else len(rl.items)
        what = f"row {k} of log row list {list_name!r}"
        if not isinstance(tensor, (torch.Tensor, Compressed)):
            raise TypeError(f"{what}: expected a tensor or Compressed, got {type(tensor).__name__}")
        given = (tensor.numel,) if isinstance(tensor, Compressed) else tuple(tensor.shape)
        if rl is None:
            place = self._placement_for(what, given, placement, None)
        else:
            place = self._rplace[list_name]
            if placement is not None and placement != place:
                raise ValueError(f"{what}: row list is {place}, not {placement}")
            if place == "flat" and given not in ((self.dim,), (self.hi - self.lo,)):
                raise ValueError(f"{what}: shape {given} differs from the list's {rl.shape}")
        if place == "flat":
            tensor = self._local_part(what, tensor, False)
        if isinstance(tensor, Compressed):
            c = self._own_compressed(tensor, what)
            shape = (self.dim,) if place == "flat" else ((c.numel,) if rl is None else rl.shape)
        else:
            use = fmt or (rl.fmt if rl is not None else self.fmt)
            shape = (self.dim,) if place == "flat" else tuple(tensor.shape)
            c = self._compress(tensor, use, self.block if rl is None else rl.block, what)
        if rl is None:
            rl = self._rows[list_name] = _Rows(c.fmt, c.numel, c.block, shape)
            self._rplace[list_name] = place
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
        return out.reshape(self._local_shape(list_name))

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
        shard = f", shard={self.rank}/{self.world} [{self.lo}, {self.hi})" if self.is_shard else ""
        return (f"GradientLog(params={len(self.param_names)}, dim={self.dim}, fmt={self.fmt!r}, "
                f"block={self.block}, entries={len(self._entries)}, row_lists={len(self._rows)} "
                f"({nrows} rows), nbytes={self.nbytes()}, ratio={self.compression_ratio():.2f}x{shard})")

    def summary(self, max_params: int = 40) -> str:
        """Multi-line human-readable description: parameters, entries (format, shape, bytes), row
        lists, meta, sizes and compression ratio."""
        lines = [f"GradientLog: {len(self.param_names)} parameters, {self.dim:,} elements, "
                 f"default format {self.fmt} (block {self.block})"]
        if self.is_shard:
            lines.append(f"shard: rank {self.rank} of {self.world}, flat range [{self.lo}, {self.hi}) "
                         f"(aligned to {self.align}); entries owned by other ranks: {len(self._remote)}")
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

    # ---- sharding ----------------------------------------------------------------------------

    @property
    def is_shard(self) -> bool:
        """True for one rank's shard of a log split over ``world > 1`` ranks."""
        return self.world > 1

    def local(self, vec: torch.Tensor) -> torch.Tensor:
        """This shard's part ``vec[lo:hi]`` of a full flat vector (e.g. from :meth:`flatten`); the
        vector itself on a full log."""
        if vec.dim() != 1 or vec.numel() != self.dim:
            raise ValueError(f"expected a 1-D vector of {self.dim} elements, got shape {tuple(vec.shape)}")
        return vec[self.lo:self.hi]

    def placement_of(self, name: str) -> Placement:
        """Where entry or row list ``name`` lives: ``"flat"``, ``"replicated"`` or its owner rank."""
        if name in self._entries:
            return self._eplace[name]
        if name in self._remote:
            return self._remote[name][0]
        if name in self._rows:
            return self._rplace[name]
        raise KeyError(f"no entry or row list {name!r} in the log")

    def shard_range(self, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
        """``[lo, hi)`` of the flat vectors held by ``rank`` of ``world`` (default: this shard's
        rank and world), balanced and aligned to :attr:`align`."""
        world = self.world if world is None else world
        rank = self.rank if rank is None else rank
        return shard_range(self.dim, rank, world, self.align)

    def default_align(self) -> int:
        """Smallest shard alignment that splits every stored flat vector without re-quantising:
        the largest quantisation block among the log's block and its flat compressed items."""
        a = self.block
        for n, e in self._entries.items():
            if self._eplace[n] == "flat" and isinstance(e, Compressed):
                a = max(a, e.block)
        for n, rl in self._rows.items():
            if self._rplace[n] == "flat":
                a = max(a, rl.block)
        return a

    def _empty_like(self) -> "GradientLog":
        log = type(self)(self.param_names, self.shapes, self.dtypes, fmt=self.fmt, block=self.block,
                         all_trainable=self.all_trainable)
        log.meta = dict(self.meta)
        return log

    def _set_shard(self, rank: int, world: int, align: int) -> None:
        if not isinstance(align, int) or align < 1 or align % self.block:
            raise ValueError(f"align must be a positive multiple of the block {self.block}, got {align!r}")
        self.rank, self.world, self.align = rank, world, align
        self.lo, self.hi = shard_range(self.dim, rank, world, align)

    def shard_of(self, rank: int, world: int, align: int | None = None) -> "GradientLog":
        """Rank ``rank``'s shard of this (full) log split ``world`` ways, as a new log.

        Flat entries and rows keep elements ``[lo, hi)`` (:meth:`shard_range`; boundaries are
        multiples of ``align``, default :meth:`default_align`, so compressed vectors split without
        re-quantising: the shard holds exactly the bytes of the full log's slice); replicated
        entries and row lists are shared with this log (not copied); an entry owned by rank ``r``
        goes to rank ``r % world`` only. ``shard_of(0, 1)`` is a full log equal to this one
        (owners kept). Under DDP, a Recorder may also start from an empty
        ``for_model(...).shard_of(rank, world)`` and give it whole flat vectors: each rank keeps
        (and compresses) only its slice.
        """
        if self.is_shard:
            raise ValueError("shard_of needs a full log; reassemble shards with GradientLog.from_shards "
                             "or gather()")
        if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank {rank!r} is not in [0, {world!r})")
        out = self._empty_like()
        out._set_shard(rank, world, self.default_align() if align is None else align)
        lo, hi = out.lo, out.hi
        for n, e in self._entries.items():
            p = self._eplace[n]
            if p == "flat":
                part = slice_compressed(e, lo, hi) if isinstance(e, Compressed) else _own(e[lo:hi])
                out._store(n, part, self._shapes[n], p)
            elif p == "replicated":
                out._store(n, e, self._shapes[n], p)
            else:
                o = p if world == 1 else p % world
                if world == 1 or o == rank:
                    out._store(n, e, self._shapes[n], o)
                else:
                    dt = None if isinstance(e, Compressed) else _dtype_name(e.dtype)
                    out._remote[n] = (o, self._shapes[n], dt)
                    out._order[n] = None
        for n, rl in self._rows.items():
            if self._rplace[n] == "flat":
                new = _Rows(rl.fmt, hi - lo, rl.block, rl.shape)
                new.items = [slice_compressed(c, lo, hi) for c in rl.items]
            else:
                new = _Rows(rl.fmt, rl.numel, rl.block, rl.shape)
                new.items = list(rl.items)
            out._rows[n], out._rplace[n] = new, self._rplace[n]
        return out

    @classmethod
    def from_shards(cls, shards: "Iterable[GradientLog]") -> "GradientLog":
        """Reassemble the full log from all ``world`` shards of one log (in one process): flat
        vectors are concatenated, replicated items come from rank 0, owned ones from their owner.
        The inverse of :meth:`shard_of`."""
        parts = sorted(shards, key=lambda s: s.rank)
        if not parts:
            raise ValueError("from_shards needs at least one shard")
        world = parts[0].world
        if [s.rank for s in parts] != list(range(world)) or any(s.world != world for s in parts):
            raise ValueError(f"from_shards needs ranks 0..{world - 1} of one {world}-way log, got "
                             f"{[(s.rank, s.world) for s in parts]}")
        first = parts[0]
        if any((s.param_names, s.shapes, s.align) != (first.param_names, first.shapes, first.align)
               for s in parts):
            raise ValueError("shards describe different parameters or alignments")
        if world == 1:
            return first.shard_of(0, 1)
        out = first._empty_like()
        names = list(first._order) + [n for s in parts for n in s._order]
        for n in dict.fromkeys(names):
            p = next(s for s in parts if n in s._entries or n in s._remote).placement_of(n)
            if p == "flat":
                lacking = [s.rank for s in parts if n not in s._entries]
                if lacking:
                    raise ValueError(f"flat entry {n!r} is missing on rank {lacking[0]}")
                pieces = [s._entries[n] for s in parts]
                if isinstance(pieces[0], Compressed):
                    value = cat_compressed([c for c in pieces if c.numel] or pieces[:1])
                else:
                    value = torch.cat(pieces)
                out._store(n, value, first._shapes[n], p)
            elif p == "replicated":
                out._store(n, first._entries[n], first._shapes[n], p)
            else:
                holder = parts[p]
                if n not in holder._entries:
                    raise ValueError(f"entry {n!r} is owned by rank {p}, whose shard lacks it")
                out._store(n, holder._entries[n], holder._shapes[n], p)
        for n, rl in first._rows.items():
            new = _Rows(rl.fmt, rl.numel, rl.block, rl.shape)
            if first._rplace[n] == "flat":
                lacking = [s.rank for s in parts if n not in s._rows]
                if lacking:
                    raise ValueError(f"flat row list {n!r} is missing on rank {lacking[0]}")
                counts = {len(s._rows[n].items) for s in parts}
                if len(counts) != 1:
                    raise ValueError(f"row list {n!r} has different row counts on the shards: {sorted(counts)}")
                new.numel = first.dim
                for i in range(len(rl.items)):
                    pieces = [s._rows[n].items[i] for s in parts]
                    new.items.append(cat_compressed([c for c in pieces if c.numel] or pieces[:1]))
            else:
                new.items = list(rl.items)
            out._rows[n], out._rplace[n] = new, first._rplace[n]
        return out

    def full(self, name: str, dtype: torch.dtype | None = None, *, group: Any = None) -> torch.Tensor:
        """Entry ``name`` whole, with its original shape, as :meth:`get` gives it on a full log.

        On a shard this is a collective over the process group ``group`` (every rank must call
        it, in the same order): flat entries are all-gathered, an owned entry is broadcast by its
        owner; replicated entries need no communication. On a full log it is :meth:`get`.
        """
        if not self.is_shard:
            return self.get(name, dtype)
        from . import _dist
        p = self.placement_of(name)
        if p == "flat":
            return _dist.gather_flat(self.get(name, dtype), self, group).reshape(self.shape_of(name))
        if p == "replicated":
            return self.get(name, dtype)
        if name in self._entries:
            local = self.get(name, dtype)
            return _dist.broadcast_tensor(local, p, tuple(local.shape), local.dtype, group)
        _, shape, dt = self._remote[name]
        out_dtype = dtype or (torch.float32 if dt is None else _DTYPES[dt])
        return _dist.broadcast_tensor(None, p, shape, out_dtype, group)

    def full_row(self, list_name: str, i: int, dtype: torch.dtype = torch.float32, *,
                 group: Any = None) -> torch.Tensor:
        """Row ``i`` of ``list_name`` whole (decompressed to ``dtype``, original shape). On a shard
        a flat row is all-gathered over ``group`` (a collective: every rank calls it); on a full
        log, or for a replicated list, it is :meth:`row`."""
        local = self.row(list_name, i, dtype)
        if not self.is_shard or self._rplace[list_name] != "flat":
            return local
        from . import _dist
        return _dist.gather_flat(local, self, group).reshape(self._rows[list_name].shape)

    def gather(self, *, group: Any = None) -> "GradientLog":
        """The full log on every rank (a collective over ``group``): each rank's shard is sent to
        all (stored bytes, no re-quantising) and reassembled with :meth:`from_shards`. Memory:
        the whole log on every rank. A full log returns itself."""
        if not self.is_shard:
            return self
        from . import _dist
        return type(self).from_shards(_dist.all_gather_logs(self, group))

    def reshard(self, rank: int, world: int, *, group: Any = None) -> "GradientLog":
        """This log split ``world`` ways, rank ``rank``'s part. A full log is sliced locally
        (:meth:`shard_of`); a shard first gathers the full log over ``group`` (a collective)."""
        return self.gather(group=group).shard_of(rank, world, self.align if self.is_shard else None)

    # ---- saving and loading ------------------------------------------------------------------

    def save(self, path: PathLike, *, group: Any = None, timeout: float = 300.0) -> None:
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

        A shard (:attr:`is_shard`) is saved collectively: every rank of the process group
        ``group`` (default: the world group; it must have :attr:`world` ranks) calls ``save``
        with the same ``path`` on a file system all ranks share. Each rank writes and fsyncs its
        own ``rank-RRRRR-NNNNN.safetensors`` files into the new version directory; after a barrier
        (``timeout`` seconds) rank 0 writes the manifest (format version 2, naming the N shards)
        and swaps ``CURRENT``. If any rank fails or dies, every surviving rank raises and the
        previous log stays current (if a rank dies after rank 0 swapped ``CURRENT``, the others may
        raise although the new version is complete: either way ``path`` holds a whole log). A
        full log is saved by the calling process alone (format version 1, as before): under DDP,
        call it on one rank only.
        """
        from ._io import save_log
        save_log(self, path, group=group, timeout=timeout)

    @classmethod
    def load(cls, path: PathLike, model: torch.nn.Module | None = None, *, rank: int | None = None,
             world: int | None = None) -> "GradientLog":
        """Read a log written by :meth:`save`, validating everything; never unpickles.

        ``path`` is the log directory (or one of its ``v-<id>`` version directories). Checks the
        manifest (JSON, required keys, format version, its own checksum), that every tensor file
        read is present with the recorded byte size and sha256, and every tensor's dtype and
        shape. Raises :class:`FileNotFoundError` if ``path`` does not exist,
        :class:`LogFormatError` for anything truncated, corrupted, missing, of another version or
        not a log, and (when ``model`` is given) :class:`LogMismatchError` via :meth:`check_model`.

        Without ``rank``/``world`` the result is the full log (an N-shard log is reassembled),
        except inside an initialised process group of more than one rank, where it is this
        rank's shard of a ``get_world_size()``-way split. ``rank=k, world=M`` gives rank ``k``'s
        shard of an M-way split (M may differ from the number of shards saved; only the files
        overlapping the shard are read); ``rank=0, world=1`` forces the full log.
        """
        from ._io import load_log
        return load_log(cls, path, model, rank=rank, world=world)
