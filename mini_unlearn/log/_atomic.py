"""Crash-safe file I/O of a log directory: fsync, versioned directories and the ``CURRENT`` pointer.

Protocol (one writer per log directory; readers may run concurrently): a save writes a complete
new ``v-<id>/`` directory (every file fsynced, then the directory), and only then replaces
``CURRENT`` atomically (temp file, fsync, ``os.replace``, directory fsync); older versions and
leftovers of interrupted saves are removed afterwards. A crash at any moment therefore leaves
``CURRENT`` naming a complete version, old or new.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from typing import Any

from ..errors import LogFormatError
from ._format import CURRENT, FIX, VERSION_RE

__all__ = ["fsync_path", "prepare_log_dir", "new_version_name", "write_json", "swap_current",
           "remove_old_versions", "read_current"]


def fsync_path(path: str, directory: bool = False) -> None:
    """fsync a file (errors raise) or a directory (best effort: not every OS can)."""
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


def prepare_log_dir(path: str) -> None:
    """Make ``path`` ready to receive a new version: it must be absent (created), an existing log
    directory, or an empty directory; anything else raises :class:`FileExistsError`."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a log directory; choose another path")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, CURRENT)):
        foreign = [f for f in os.listdir(path)
                   if not (VERSION_RE.match(f) or f.startswith(CURRENT + ".tmp-"))]
        if foreign:
            raise FileExistsError(f"{path} is a non-empty directory that is not a GradientLog "
                                  f"(it holds {foreign[0]!r}); refusing to overwrite it")
    if not os.path.isdir(path):
        os.makedirs(path)
        fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def new_version_name() -> str:
    """A fresh, unique version directory name ``v-<time>-<random>``."""
    return f"v-{time.time_ns():x}-{secrets.token_hex(4)}"


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def swap_current(path: str, vname: str) -> None:
    """Atomically point ``path/CURRENT`` at version directory ``vname`` (which must be complete
    and fsynced already)."""
    fsync_path(os.path.join(path, vname), directory=True)
    fsync_path(path, directory=True)
    tmp = os.path.join(path, f"{CURRENT}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(vname + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, CURRENT))
    fsync_path(path, directory=True)


def remove_old_versions(path: str, keep: str) -> None:
    """Remove every version directory but ``keep`` and stray ``CURRENT`` temp files."""
    for f in os.listdir(path):
        p = os.path.join(path, f)
        if f != keep and VERSION_RE.match(f) and os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif f.startswith(CURRENT + ".tmp-"):
            try:
                os.remove(p)
            except OSError:
                pass


def read_current(cur: str) -> str:
    """The version directory name in ``CURRENT``; :class:`LogFormatError` if unreadable or not a
    version name (e.g. a path escaping the log directory)."""
    try:
        with open(cur, "rb") as f:
            raw = f.read(4096)
        vname = raw.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LogFormatError(f"{cur}: unreadable ({exc}); {FIX}") from None
    if not VERSION_RE.match(vname):
        raise LogFormatError(f"{cur}: does not name a log version (corrupted); {FIX}")
    return vname
