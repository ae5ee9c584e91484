"""Saving and loading a :class:`~mini_unlearn.log.GradientLog`: manifests, tensor files, the
single-process save (format version 1), the collective sharded save (version 2), and the
validating, resharding load. Only JSON and safetensors are read; nothing is unpickled."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LogFormatError
from ..ops import FORMATS, Compressed
from . import _atomic
from ._gradient_log import Placement
from ._format import (CURRENT, DTYPES, FILE_BYTES, FILE_RE, FIX, FORMAT_NAME, FORMAT_VERSION,
                      MANIFEST, RANK_FILE_RE, READABLE_VERSIONS, SINGLE_VERSION, VERSION_RE, PathLike,
                      bad, dtype_name, file_name, layout, manifest_checksum, sha256_file,
                      shard_range, slice_compressed, cat_compressed)

if TYPE_CHECKING:  # pragma: no cover
    from ._gradient_log import GradientLog

Tensors = dict[str, torch.Tensor]


# ---- describing what a rank holds --------------------------------------------------------------

def _auto_placement(shape: list[int] | tuple[int, ...], dim: int) -> str:
    return "flat" if list(shape) == [dim] and dim > 0 else "replicated"


def _entry_desc(e: Compressed | torch.Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    numel = math.prod(shape)
    if isinstance(e, Compressed):
        dt, _, sshape = layout(e.fmt, numel, e.block)
        return {"kind": "compressed", "fmt": e.fmt, "numel": numel, "block": e.block,
                "shape": list(shape), "data_dtype": dtype_name(dt),
                "scales_dtype": None if sshape is None else "float32"}
    return {"kind": "exact", "dtype": dtype_name(e.dtype), "numel": numel, "shape": list(shape)}


def describe_part(log: "GradientLog", *, all_local: bool = False) -> tuple[dict[str, Any], Tensors]:
    """What this rank contributes to a save: descriptors of the entries and row lists it writes
    (full, logical shapes plus ``placement``) and their local tensors. Flat items are written by
    every rank (its slice), replicated ones by rank 0 only (by every rank if ``all_local``),
    owned ones by their owner."""
    tensors: Tensors = {}
    entries: dict[str, Any] = {}
    for n, e in log._entries.items():
        p = log._eplace[n]
        if p == "replicated" and log.rank != 0 and not all_local:
            continue
        entries[n] = dict(_entry_desc(e, log._shapes[n]), placement=p)
        if isinstance(e, Compressed):
            tensors[f"entry/{n}/data"] = e.data
            if e.scales is not None:
                tensors[f"entry/{n}/scales"] = e.scales
        else:
            tensors[f"entry/{n}/data"] = e
    rows: dict[str, Any] = {}
    for n, rl in log._rows.items():
        p = log._rplace[n]
        if p == "replicated" and log.rank != 0 and not all_local:
            continue
        numel = math.prod(rl.shape)
        dt, _, sshape = layout(rl.fmt, numel, rl.block)
        rows[n] = {"fmt": rl.fmt, "numel": numel, "block": rl.block, "shape": list(rl.shape),
                   "count": len(rl.items), "data_dtype": dtype_name(dt),
                   "scales_dtype": None if sshape is None else "float32", "placement": p}
        for i, c in enumerate(rl.items):
            tensors[f"rows/{n}/{i}/data"] = c.data
            if c.scales is not None:
                tensors[f"rows/{n}/{i}/scales"] = c.scales
    remote = {n: [o, list(sh), dt] for n, (o, sh, dt) in log._remote.items()}
    return ({"rank": log.rank, "world": log.world, "range": [log.lo, log.hi], "entries": entries,
             "rows": rows, "remote": remote, "order": list(log._order)}, tensors)


def _header(log: "GradientLog", version: int) -> dict[str, Any]:
    from .. import __version__
    meta = dict(log.meta)
    meta.update(format=log.fmt, block=log.block)
    for k, v in meta.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"log.meta[{k!r}] = {v!r} is not JSON-able ({exc}); store plain "
                            "numbers, strings, lists or dicts") from None
    return {
        "format": FORMAT_NAME, "format_version": version,
        "written_by": f"mini_unlearn {__version__}",
        "fmt": log.fmt, "block": log.block,
        "params": {"names": log.param_names, "shapes": [list(s) for s in log.shapes],
                   "dtypes": [dtype_name(d) for d in log.dtypes],
                   "all_trainable": log.all_trainable},
        "entries": {}, "rows": {}, "meta": meta,
    }


def _write_tensor_files(vdir: str, tensors: Mapping[str, torch.Tensor], rank: int | None) -> list[dict[str, Any]]:
    """Write ``tensors`` into safetensors files (a new one past 1 GiB), each fsynced; their
    manifest records (name, bytes, sha256, tensor count; ``rank`` for a shard)."""
    groups: list[Tensors] = [{}]
    size = 0
    for k, t in tensors.items():
        b = t.numel() * t.element_size()
        if groups[-1] and size + b > FILE_BYTES:
            groups.append({})
            size = 0
        groups[-1][k] = t.detach().cpu().contiguous()
        size += b
    files = []
    for i, g in enumerate(groups):
        if not g and i > 0:
            continue
        fname = file_name(rank, i)
        fpath = os.path.join(vdir, fname)
        save_file(g, fpath)
        _atomic.fsync_path(fpath)
        rec: dict[str, Any] = {"name": fname, "bytes": os.path.getsize(fpath),
                               "sha256": sha256_file(fpath), "tensors": len(g)}
        if rank is not None:
            rec["rank"] = rank
        files.append(rec)
    return files


# ---- saving ------------------------------------------------------------------------------------

def save_log(log: "GradientLog", path: PathLike, *, group: Any = None, timeout: float = 300.0) -> None:
    """:meth:`GradientLog.save`: single-process (version 1) for a full log, collective (version 2)
    for a shard."""
    path = os.fspath(path)
    if log.is_shard:
        _save_sharded(log, path, group, timeout)
    else:
        _save_single(log, path)


def _save_single(log: "GradientLog", path: str) -> None:
    body = _header(log, SINGLE_VERSION)
    part, tensors = describe_part(log)
    for sect in ("entries", "rows"):
        for n, d in part[sect].items():
            p = d.pop("placement")
            if p != _auto_placement(d["shape"], log.dim):
                d["placement"] = p  # only where it differs from the default rule (old readers ignore it)
            body[sect][n] = d
    _atomic.prepare_log_dir(path)
    vname = _atomic.new_version_name()
    vdir = os.path.join(path, vname)
    os.mkdir(vdir)
    body["files"] = _write_tensor_files(vdir, tensors, None)
    body["checksum"] = manifest_checksum(body)
    _atomic.write_json(os.path.join(vdir, MANIFEST), body)
    _atomic.swap_current(path, vname)
    _atomic.remove_old_versions(path, vname)


def merge_parts(log: "GradientLog", parts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0: the manifest's entries and row lists from every rank's :func:`describe_part`,
    checking that flat items are on every rank alike and owned ones on their owner."""
    world = len(parts)
    entries: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for sect, out in (("entries", entries), ("rows", rows)):
        kind = "entry" if sect == "entries" else "row list"
        for part in parts:
            for n, d in part[sect].items():
                p = d["placement"]
                if n in out:
                    if p == "flat" and d != out[n]:
                        raise ValueError(f"{kind} {n!r} differs between ranks "
                                         f"({out[n]} vs {d} on rank {part['rank']})")
                    if isinstance(p, int):
                        raise ValueError(f"entry {n!r} is held by more than one rank")
                    continue
                if isinstance(p, int) and p != part["rank"]:
                    raise ValueError(f"entry {n!r} is owned by rank {p} but written by rank {part['rank']}")
                if p == "replicated" and part["rank"] != 0:
                    raise ValueError(f"replicated {kind} {n!r} is missing on rank 0")
                out[n] = d
        for n, d in out.items():
            if d["placement"] == "flat":
                lacking = [pt["rank"] for pt in parts if n not in pt[sect]]
                if lacking:
                    raise ValueError(f"flat {kind} {n!r} is missing on rank {lacking[0]} "
                                     f"(every rank must store its slice)")
    for part in parts:
        for n, (o, _, _) in part["remote"].items():
            if n not in entries and not any(n in pt["entries"] for pt in parts):
                raise ValueError(f"entry {n!r} is owned by rank {o}, which did not store it")
    if world and any(pt["world"] != world for pt in parts):
        raise ValueError("ranks disagree on the number of shards")
    order = [n for pt in parts for n in pt.get("order", [])] + list(entries)
    return {n: entries[n] for n in dict.fromkeys(order) if n in entries}, rows


def _save_sharded(log: "GradientLog", path: str, group: Any, timeout: float) -> None:
    from . import _dist
    _dist.check_group(log, group)
    rank = log.rank
    vname, err = "", ""
    first_exc: BaseException | None = None
    if rank == 0:
        try:
            _header(log, FORMAT_VERSION)  # meta must be JSON-able: fail before touching the disk
            _atomic.prepare_log_dir(path)
            vname = _atomic.new_version_name()
            os.mkdir(os.path.join(path, vname))
        except Exception as exc:  # every rank must learn of it, else they wait forever
            err = f"{type(exc).__name__}: {exc}"
            first_exc = exc
    msg = json.loads(_dist.broadcast_bytes(json.dumps({"v": vname, "e": err}).encode(), 0, group))
    if msg["e"]:
        if first_exc is not None:
            raise first_exc
        raise RuntimeError(f"sharded save to {path} failed on rank 0: {msg['e']}")
    vname = msg["v"]
    if not VERSION_RE.match(vname):
        raise RuntimeError(f"sharded save: rank 0 sent a bad version name {vname!r}")
    vdir = os.path.join(path, vname)
    # phase 1: every rank writes and fsyncs its own files
    own_exc: BaseException | None = None
    try:
        part, tensors = describe_part(log)
        if not os.path.isdir(vdir):
            raise FileNotFoundError(f"{vdir} is not visible from rank {rank}: a sharded save needs "
                                    "a file system shared by all ranks")
        part["files"] = _write_tensor_files(vdir, tensors, rank)
        _atomic.fsync_path(vdir, directory=True)
        status: dict[str, Any] = {"ok": True, "part": part}
    except Exception as exc:
        own_exc = exc
        status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    _dist.barrier(timeout, group)  # every rank's files are durable before rank 0 commits
    statuses = [json.loads(b.decode("utf-8"))
                for b in _dist.all_gather_bytes(json.dumps(status).encode("utf-8"), group)]
    failed = [(r, s["error"]) for r, s in enumerate(statuses) if not s["ok"]]
    if failed:
        if own_exc is not None:
            raise own_exc
        raise RuntimeError(f"sharded save to {path} failed on rank {failed[0][0]}: {failed[0][1]}; "
                           "the previous log is unchanged")
    # phase 2: rank 0 writes the manifest and swaps CURRENT
    err = ""
    if rank == 0:
        try:
            parts = [s["part"] for s in statuses]
            body = _header(log, FORMAT_VERSION)
            body["entries"], body["rows"] = merge_parts(log, parts)
            body["files"] = [fd for pt in parts for fd in pt["files"]]
            body["shards"] = {"world": log.world, "align": log.align,
                              "ranges": [list(pt["range"]) for pt in parts]}
            body["checksum"] = manifest_checksum(body)
            _atomic.write_json(os.path.join(vdir, MANIFEST), body)
            _atomic.swap_current(path, vname)
        except Exception as exc:
            own_exc, err = exc, f"{type(exc).__name__}: {exc}"
    err = _dist.broadcast_bytes(err.encode("utf-8"), 0, group).decode("utf-8")
    if err:
        if own_exc is not None:
            raise own_exc
        raise RuntimeError(f"sharded save to {path} failed on rank 0: {err}; the previous log is unchanged")
    if rank == 0:
        _atomic.remove_old_versions(path, vname)


# ---- loading -----------------------------------------------------------------------------------

def load_log(cls: type["GradientLog"], path: PathLike, model: torch.nn.Module | None, *,
             rank: int | None, world: int | None) -> "GradientLog":
    """:meth:`GradientLog.load`."""
    if (rank is None) != (world is None):
        raise ValueError("give both rank and world, or neither")
    if world is None:
        from . import _dist
        ctx = _dist.context()
        rank, world = ctx if ctx is not None and ctx[1] > 1 else (0, 1)
    if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank {rank!r} is not in [0, {world!r})")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such log (no file or directory)")
    if not os.path.isdir(path):
        raise LogFormatError(f"{path}: not a GradientLog (a log is a directory written by "
                             "GradientLog.save)")
    cur = os.path.join(path, CURRENT)
    if not os.path.exists(cur):
        if os.path.exists(os.path.join(path, MANIFEST)):
            log = _load_version(cls, path, rank, world)
        elif any(VERSION_RE.match(f) for f in os.listdir(path)):
            raise LogFormatError(f"{path}: holds no complete log (its first save was interrupted, "
                                 f"{CURRENT} is missing); {FIX}")
        else:
            raise LogFormatError(f"{path}: not a GradientLog (no {CURRENT} or {MANIFEST} in it)")
    else:
        for attempt in range(3):  # a concurrent save may swap CURRENT and remove our version
            vname = _atomic.read_current(cur)
            try:
                log = _load_version(cls, os.path.join(path, vname), rank, world)
                break
            except LogFormatError:
                if attempt == 2 or _atomic.read_current(cur) == vname:
                    raise
    if model is not None:
        log.check_model(model)
    return log


def read_manifest(vdir: str) -> dict[str, Any]:
    """The validated manifest of version directory ``vdir``: JSON, a GradientLog's, a readable
    format version, every required key, and its own checksum."""
    mpath = os.path.join(vdir, MANIFEST)
    if not os.path.isfile(mpath):
        raise bad(vdir, f"{MANIFEST} is missing")
    try:
        with open(mpath, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise bad(mpath, f"not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise LogFormatError(f"{mpath}: not a GradientLog manifest")
    ver = m.get("format_version")
    if ver not in READABLE_VERSIONS:
        from .. import __version__
        hint = ("upgrade mini_unlearn" if isinstance(ver, int) and ver > FORMAT_VERSION
                else "re-record the log")
        raise LogFormatError(f"{mpath}: log format version {ver!r}, this mini_unlearn "
                             f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}; {hint}")
    required = ("fmt", "block", "params", "entries", "rows", "meta", "files", "checksum")
    required += ("shards",) if ver >= 2 else ()
    missing = [k for k in required if k not in m]
    if missing:
        raise bad(mpath, f"manifest lacks {missing[0]!r}")
    try:
        ok = manifest_checksum(m) == m["checksum"]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise bad(mpath, "manifest checksum mismatch (corrupted)")
    return m


def _load_version(cls: type["GradientLog"], vdir: str, rank: int, world: int) -> "GradientLog":
    m = read_manifest(vdir)
    mpath = os.path.join(vdir, MANIFEST)
    try:
        return _build(cls, vdir, m, rank, world)
    except LogFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise bad(mpath, f"malformed manifest ({type(exc).__name__}: {exc})") from None


def _read_files(vdir: str, mpath: str, files: list[dict[str, Any]]) -> Tensors:
    """Check (presence, size, sha256) and parse the safetensors files ``files`` of ``vdir``."""
    tensors: Tensors = {}
    for fd in files:
        fname = fd["name"]
        fpath = os.path.join(vdir, fname)
        if not os.path.isfile(fpath):
            raise bad(fpath, "tensor file is missing")
        size = os.path.getsize(fpath)
        if size != fd["bytes"]:
            raise bad(fpath, f"{size} bytes on disk, {fd['bytes']} recorded (truncated or altered)")
        if sha256_file(fpath) != fd["sha256"]:
            raise bad(fpath, "sha256 checksum mismatch (corrupted)")
        try:
            part = load_file(fpath)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise bad(fpath, f"unreadable safetensors file ({exc})") from None
        for k in part:
            if k in tensors:
                raise bad(fpath, f"tensor {k!r} appears twice")
        tensors.update(part)
    return tensors


def _keys(prefix: str, d: Mapping[str, Any]) -> list[str]:
    if d.get("kind", "compressed") == "exact" or layout(d["fmt"], 1, d["block"])[2] is None:
        return [f"{prefix}/data"]
    return [f"{prefix}/data", f"{prefix}/scales"]


class _Decoder:
    """Typed, shape-checked access to one rank's tensors (with the manifest's descriptors)."""

    def __init__(self, where: str, mpath: str, tensors: Tensors):
        self.where, self.mpath, self.tensors = where, mpath, tensors

    def take(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.tensors:
            raise bad(self.where, f"tensor {key!r} is missing from the tensor files")
        t = self.tensors[key]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise bad(self.where, f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, the manifest says "
                                  f"{dtype} {tuple(shape)}")
        return t

    def compressed(self, prefix: str, d: Mapping[str, Any], numel: int, what: str) -> Compressed:
        fmt, block = d["fmt"], d["block"]
        if fmt not in FORMATS or not isinstance(block, int) or block <= 0:
            raise bad(self.mpath, f"{what}: bad fmt/numel/block")
        dt, dshape, sshape = layout(fmt, numel, block)
        data = self.take(f"{prefix}/data", dt, dshape)
        scales = None if sshape is None else self.take(f"{prefix}/scales", torch.float32, sshape)
        return Compressed(fmt, data, scales, numel, block)

    def exact(self, prefix: str, d: Mapping[str, Any], shape: tuple[int, ...], what: str) -> torch.Tensor:
        if d["dtype"] not in DTYPES:
            raise bad(self.mpath, f"{what}: unknown dtype {d['dtype']!r}")
        return self.take(f"{prefix}/data", DTYPES[d["dtype"]], shape)


def _check_desc(mpath: str, d: Mapping[str, Any], what: str, rows: bool) -> tuple[int, ...]:
    """Validate an entry/row-list descriptor's numbers; its (logical) shape."""
    numel = d["numel"]
    kind = "compressed" if rows else d["kind"]
    if kind not in ("compressed", "exact"):
        raise bad(mpath, f"{what}: unknown kind {d['kind']!r}")
    if kind == "compressed":
        if d["fmt"] not in FORMATS or not isinstance(numel, int) or numel < 0 or \
                not isinstance(d["block"], int) or d["block"] <= 0:
            raise bad(mpath, f"{what}: bad fmt/numel/block")
    elif not isinstance(numel, int) or numel < 0:
        raise bad(mpath, f"{what}: bad numel")
    sh = tuple(d["shape"])
    if not all(isinstance(s, int) and s >= 0 for s in sh) or math.prod(sh) != numel:
        raise bad(mpath, f"{what}: shape {list(sh)} does not hold {numel} elements")
    if rows and (not isinstance(d["count"], int) or d["count"] < 1):
        raise bad(mpath, f"{what}: bad row count {d['count']!r}")
    return sh


def _build(cls: type["GradientLog"], vdir: str, m: dict[str, Any], rank: int, world: int) -> "GradientLog":
    mpath = os.path.join(vdir, MANIFEST)
    p = m["params"]
    dtypes = []
    for s in p["dtypes"]:
        if s not in DTYPES:
            raise bad(mpath, f"unknown parameter dtype {s!r}")
        dtypes.append(DTYPES[s])
    fmt, block = m["fmt"], m["block"]
    if fmt not in FORMATS or not isinstance(block, int) or block <= 0:
        raise bad(mpath, "bad default fmt/block")
    log = cls(p["names"], p["shapes"], dtypes, fmt=fmt, block=block,
              all_trainable=bool(p.get("all_trainable", False)))
    if not isinstance(m["meta"], dict):
        raise bad(mpath, "meta is not an object")
    log.meta = dict(m["meta"])
    dim = log.dim
    entries, rows = m["entries"], m["rows"]
    if not isinstance(entries, dict) or not isinstance(rows, dict):
        raise bad(mpath, "entries/rows are not objects")

    # source layout: N shards with their ranges and files
    files_of: dict[int, list[dict[str, Any]]] = {}
    if m["format_version"] == 1:
        n_src = 1
        for fd in m["files"]:
            if not isinstance(fd["name"], str) or not FILE_RE.match(fd["name"]):
                raise bad(mpath, f"bad tensor file name {fd['name']!r}")
            files_of.setdefault(0, []).append(fd)
        place = {("e", n): d.get("placement", _auto_placement(d["shape"], dim)) for n, d in entries.items()}
        place.update({("r", n): d.get("placement", _auto_placement(d["shape"], dim)) for n, d in rows.items()})
        align = block
        for (k, n), pl in place.items():
            d = entries[n] if k == "e" else rows[n]
            if pl == "flat" and (k == "r" or d["kind"] == "compressed") and isinstance(d["block"], int):
                align = max(align, d["block"])
        ranges = [(0, dim)]
    else:
        sh = m["shards"]
        n_src, align = sh["world"], sh["align"]
        if not isinstance(n_src, int) or n_src < 1 or not isinstance(align, int) or align < 1 \
                or align % block:
            raise bad(mpath, f"bad shards world/align {n_src!r}/{align!r}")
        ranges = [tuple(r) for r in sh["ranges"]]
        if ranges != [shard_range(dim, s, n_src, align) for s in range(n_src)]:
            raise bad(mpath, f"shard ranges {sh['ranges']} do not tile the {dim} flat elements")
        for fd in m["files"]:
            s, fname = fd["rank"], fd["name"]
            if not isinstance(s, int) or not 0 <= s < n_src or not isinstance(fname, str) \
                    or not RANK_FILE_RE.match(fname) or not fname.startswith(f"rank-{s:05d}-"):
                raise bad(mpath, f"bad tensor file name {fname!r} for rank {s!r}")
            files_of.setdefault(s, []).append(fd)
        place = {("e", n): d["placement"] for n, d in entries.items()}
        place.update({("r", n): d["placement"] for n, d in rows.items()})
    for (k, n), pl in place.items():
        d = entries[n] if k == "e" else rows[n]
        what = f"{'entry' if k == 'e' else 'row list'} {n!r}"
        if pl == "flat":
            if list(d["shape"]) != [dim]:
                raise bad(mpath, f"{what}: flat, but shape {d['shape']} is not [{dim}]")
            if (k == "r" or d["kind"] == "compressed") and (not isinstance(d["block"], int)
                                                             or d["block"] <= 0 or align % d["block"]):
                raise bad(mpath, f"{what}: block {d['block']!r} does not divide the alignment {align}")
        elif pl == "replicated":
            pass
        elif not (isinstance(pl, int) and not isinstance(pl, bool) and k == "e" and 0 <= pl
                  and (n_src == 1 or pl < n_src)):
            raise bad(mpath, f"{what}: bad placement {pl!r}")

    def holder(pl: Placement) -> int:
        """Source rank whose files hold a non-flat item (a 1-shard log holds everything)."""
        return 0 if pl == "replicated" or n_src == 1 else int(pl)

    def new_owner(pl: int) -> int:
        return pl if world == 1 else pl % world

    # target: full log (world 1) or rank `rank` of `world`
    if world > 1:
        log._set_shard(rank, world, align)
    else:
        log.align = align
    tlo, thi = log.lo, log.hi

    # which source ranks hold something the target needs
    overlap = [s for s in range(n_src) if max(tlo, ranges[s][0]) < min(thi, ranges[s][1])]
    need: set[int] = set()
    if any(pl == "flat" for pl in place.values()):
        need.update(overlap)
    if any(pl == "replicated" for pl in place.values()):
        need.add(0)
    need.update(holder(pl) for pl in place.values() if isinstance(pl, int) and (world == 1 or new_owner(pl) == rank))
    expected: dict[int, set[str]] = {s: set() for s in range(n_src)}
    for (k, n), pl in place.items():
        d = entries[n] if k == "e" else rows[n]
        prefixes = [f"entry/{n}"] if k == "e" else [f"rows/{n}/{i}" for i in range(d["count"])] \
            if isinstance(d["count"], int) else []
        holders = range(n_src) if pl == "flat" else [holder(pl)]
        for s in holders:
            for pre in prefixes:
                expected[s].update(_keys(pre, d))
    dec: dict[int, _Decoder] = {}
    for s in sorted(need):
        where = os.path.join(vdir, files_of[s][0]["name"]) if files_of.get(s) else vdir
        t = _read_files(vdir, mpath, files_of.get(s, []))
        extra = set(t) - expected[s]
        if extra:
            raise bad(where if n_src > 1 else vdir,
                      f"unexpected tensor {sorted(extra)[0]!r} not described by the manifest")
        dec[s] = _Decoder(vdir, mpath, t)

    def flat_piece(get: Callable[[_Decoder, int], Compressed | torch.Tensor],
                   d: Mapping[str, Any]) -> Compressed | torch.Tensor:
        """The target's range of a flat vector, cut from the overlapping source shards."""
        pieces = []
        for s in overlap:
            slo, shi = ranges[s]
            src = get(dec[s], shi - slo)
            a, b = max(tlo, slo) - slo, min(thi, shi) - slo
            if (a, b) != (0, shi - slo):
                src = slice_compressed(src, a, b) if isinstance(src, Compressed) else src[a:b]
            pieces.append(src)
        if not pieces:  # an empty shard (dim smaller than world * align)
            if d.get("kind") == "exact":
                return torch.empty(0, dtype=DTYPES[d["dtype"]])
            dt, _, sshape = layout(d["fmt"], 0, d["block"])
            return Compressed(d["fmt"], torch.empty(0, dtype=dt),
                              None if sshape is None else torch.empty(0), 0, d["block"])
        if len(pieces) == 1:
            return pieces[0]
        return cat_compressed(pieces) if isinstance(pieces[0], Compressed) else torch.cat(pieces)

    for n, d in entries.items():
        what = f"entry {n!r}"
        shape = _check_desc(mpath, d, what, rows=False)
        pl = place[("e", n)]
        exact = d["kind"] == "exact"
        if pl == "flat":
            if exact:
                value = flat_piece(lambda dc, k: dc.exact(f"entry/{n}", d, (k,), what), d)
            else:
                value = flat_piece(lambda dc, k: dc.compressed(f"entry/{n}", d, k, what), d)
            log._store(n, value, shape, pl)
            continue
        src = holder(pl)
        newp = pl if pl == "replicated" else new_owner(pl)
        if pl != "replicated" and world > 1 and newp != rank:
            log._remote[n] = (newp, shape, d["dtype"] if exact else None)
            log._order[n] = None
            continue
        value = dec[src].exact(f"entry/{n}", d, shape, what) if exact else \
            dec[src].compressed(f"entry/{n}", d, d["numel"], what)
        log._store(n, value, shape, newp)
    from ._gradient_log import _Rows
    for n, d in rows.items():
        what = f"row list {n!r}"
        shape = _check_desc(mpath, d, what, rows=True)
        pl = place[("r", n)]
        if pl == "flat":
            items = [flat_piece(lambda dc, k, i=i: dc.compressed(f"rows/{n}/{i}", d, k, f"{what} row {i}"), d)
                     for i in range(d["count"])]
        else:
            items = [dec[0].compressed(f"rows/{n}/{i}", d, d["numel"], f"{what} row {i}")
                     for i in range(d["count"])]
        rl = _Rows(d["fmt"], items[0].numel, d["block"], shape)
        rl.items = items
        log._rows[n], log._rplace[n] = rl, pl
    return log


def shard_from_part(template: "GradientLog", part: dict[str, Any], tensors: Tensors,
                    rank: int) -> "GradientLog":
    """Rebuild rank ``rank``'s shard from its :func:`describe_part` output (used by gather)."""
    from ._gradient_log import _Rows
    log = template._empty_like()
    log._set_shard(rank, template.world, template.align)
    dc = _Decoder(f"rank {rank}", f"rank {rank}", tensors)
    local = log.hi - log.lo
    for n, d in part["entries"].items():
        pl, shape = d["placement"], tuple(d["shape"])
        k = local if pl == "flat" else d["numel"]
        value = dc.exact(f"entry/{n}", d, (k,) if pl == "flat" else shape, n) if d["kind"] == "exact" \
            else dc.compressed(f"entry/{n}", d, k, n)
        log._store(n, value, shape, pl)
    for n, d in part["rows"].items():
        pl = d["placement"]
        k = local if pl == "flat" else d["numel"]
        rl = _Rows(d["fmt"], k, d["block"], tuple(d["shape"]))
        rl.items = [dc.compressed(f"rows/{n}/{i}", d, k, n) for i in range(d["count"])]
        log._rows[n], log._rplace[n] = rl, pl
    for n, (o, sh, dt) in part["remote"].items():
        log._remote[n] = (o, tuple(sh), dt)
    log._order = {n: None for n in part.get("order", [])}
    log._order.update((n, None) for n in list(log._entries) + list(log._remote))
    return log
