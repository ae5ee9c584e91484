"""The ``mini-unlearn`` command line (also ``python -m mini_unlearn``).

Subcommands are registered in :func:`_build_parser`; each sets ``func`` (taking the parsed
arguments, returning an exit code). Expected failures (a missing path, a bad log, ...) print one
line on stderr and exit with code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import MiniUnlearnError

_PROG = "mini-unlearn"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .log import GradientLog

    log = GradientLog.load(args.path)
    print(log.summary())
    return 0


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG, description="mini_unlearn: fast machine unlearning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="validate a saved GradientLog and print its summary",
                       description="Load (and fully validate) a GradientLog directory and print its "
                                   "parameters, entries, row lists, meta, sizes and compression ratio.")
    p.add_argument("path", help="log directory written by GradientLog.save")
    p.set_defaults(func=_cmd_inspect)

    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0), or raises ``SystemExit(2)`` after printing
    a one-line error for expected failures."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MiniUnlearnError, OSError) as exc:
        print(f"{_PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
