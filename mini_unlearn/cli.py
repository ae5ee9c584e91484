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


class _BadArguments(MiniUnlearnError):
    """A command's arguments are wrong (reported in one line, exit code 2)."""


def _number_list(text: str, kind: type, flag: str) -> tuple:
    """``"0,1,2"`` -> ``(0, 1, 2)``; a one-line error for empty lists and non-numbers."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise _BadArguments(f"{flag} is empty: give at least one value (e.g. {flag} "
                            f"{'0,1,2' if kind is int else '0.1,0.3'})")
    if any(not t for t in items):
        raise _BadArguments(f"{flag} {text!r} has an empty entry")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise _BadArguments(f"{flag} {text!r}: expected comma-separated "
                            f"{'integers' if kind is int else 'numbers'}") from None


def _config(args: argparse.Namespace):
    from .data import load_dataset
    from .experiment import Config

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    ratios = _number_list(args.forget_ratio, float, "--forget-ratio")
    seeds = _number_list(args.seeds, int, "--seeds") if args.seeds is not None else (args.seed,)
    cfg = Config(data=args.data, model=args.model, forget_ratio=ratios[0], methods=methods,
                 seed=seeds[0], recipe=args.recipe, epochs=args.epochs, checkpoints=args.checkpoints,
                 compression=args.compression, device=args.device, seeds=seeds, forget_ratios=ratios,
                 optimizer=args.optimizer, train_subset=args.train_subset)
    try:
        cfg.validate()
        load_dataset(cfg.data, seed=cfg.seed)  # fail fast on a missing or malformed file
    except ValueError as exc:
        raise _BadArguments(str(exc)) from None
    return cfg


#: the methods ``run`` accepts inside a torchrun job: Mini-Unlearning is data-parallel; the
#: retraining oracle runs on every rank alike (seeded, identical), as does the training
DISTRIBUTED_METHODS = ("mini", "mini_retain", "retrain")


class _Torchrun:
    """Inside ``torchrun`` (WORLD_SIZE > 1 in the environment): initialise the process group
    (gloo on CPU, NCCL for --device cuda), refuse methods without a data-parallel path, and
    destroy the group on exit. ``rank`` is 0 outside torchrun."""

    def __init__(self, cfg):
        import os
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.owned = 0, False
        if self.world < 2:
            return
        bad = [m for m in cfg.methods if m not in DISTRIBUTED_METHODS]
        if bad:
            raise _BadArguments(f"under torchrun ({self.world} processes) `run` supports only "
                                f"--methods {','.join(DISTRIBUTED_METHODS)}; {', '.join(bad)} have no "
                                "data-parallel path: run them in one process")
        self.cuda = cfg.device == "cuda"

    def __enter__(self) -> "_Torchrun":
        if self.world < 2:
            return self
        import datetime
        import os

        import torch
        import torch.distributed as dist
        if not dist.is_initialized():
            if self.cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=10))
            self.owned = True
        self.rank = dist.get_rank()
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(cfg, json_path: str, plot_path: str | None, markdown_path: str | None = None) -> int:
    with _Torchrun(cfg) as job:
        return _run_job(cfg, json_path, plot_path, markdown_path, write=job.rank == 0)


def _run_job(cfg, json_path: str, plot_path: str | None, markdown_path: str | None, write: bool) -> int:
    """The experiment; only ``write`` (rank 0 under torchrun) prints and writes files."""
    import json

    from .experiment import (format_markdown, format_sweep_table, format_table, plot, plot_sweep,
                             run_experiment, run_sweep)

    if cfg.is_sweep:
        result = run_sweep(cfg, progress=write and sys.stderr.isatty())
        if not write:
            return 0
        print(format_sweep_table(result))
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {json_path}")
        if markdown_path:
            with open(markdown_path, "w") as fh:
                fh.write(format_markdown(result) + "\n")
            print(f"wrote {markdown_path}")
        if plot_path:
            plot_sweep(result, plot_path)
            print(f"wrote {plot_path}")
        return 0
    result = run_experiment(cfg, progress=write and sys.stderr.isatty())
    if not write:
        return 0
    print(format_table(result))
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path)
        print(f"wrote {plot_path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return _run(_config(args), args.json, args.plot, args.markdown)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiment import ALL_METHODS, Config

    cfg = Config(data="mnist5k", model="mlp", forget_ratio=0.3, methods=ALL_METHODS, seed=args.seed)
    return _run(cfg, args.json, args.plot)


def _cmd_audit(args: argparse.Namespace) -> int:
    import json

    from .audit import AuditConfig, AuditError, format_audit_table, run_audit
    from .data import load_dataset

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = AuditConfig(data=args.data, model=args.model, methods=methods, shadows=args.shadows,
                      targets=args.targets, seed=args.seed, recipe=args.recipe, epochs=args.epochs,
                      train=args.train, pool=args.pool, weight_decay=args.weight_decay, lr=args.lr)
    try:
        cfg.validate()
        load_dataset(cfg.data, seed=cfg.seed)  # fail fast on a missing or malformed file
    except (AuditError, ValueError) as exc:
        raise _BadArguments(str(exc)) from None
    result = run_audit(cfg, progress=sys.stderr.isatty())
    print(format_audit_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        mod = importlib.import_module(f"benchmarks.bench_{args.what}")
    except ImportError as exc:
        raise _BadArguments(f"the benchmarks live in the source checkout (benchmarks/): {exc}") from None
    argv = ["--json", args.json] + (["--quick"] if args.quick else []) + (["--plot", args.plot] if args.plot else [])
    if args.what == "kernels":
        argv += ["--device", args.device]
    elif args.device != "cpu":
        raise _BadArguments("bench unlearn runs on the CPU; --device applies to bench kernels")
    return int(mod.main(argv) or 0)


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

    from .experiment import ALL_METHODS

    p = sub.add_parser("run", help="train with recording, unlearn with every method, compare",
                       description="Train the original model with recording (tqdm progress), pick a "
                                   "seeded random forget set, run every method, evaluate each against "
                                   "retraining (and a second retraining's noise floor), print a table "
                                   "and write JSON (and a plot). With several --seeds and/or "
                                   "--forget-ratio values: every (seed, ratio) pair, the original "
                                   "trained once per seed; mean ± std per method and ratio, the best "
                                   "Avg.Gap marked; the JSON keeps every run and the aggregates; the "
                                   "plot shows Avg.Gap against speed-up over retraining.")
    p.add_argument("--data", default="mnist5k", help="digits, mnist5k, fashion-mnist or PATH.npz")
    p.add_argument("--model", default="mlp", help="logreg, mlp, cnn, resnet or gpt (see models.MODEL_KINDS)")
    p.add_argument("--forget-ratio", default="0.3",
                   help="fraction of training data to forget, in (0, 1); comma-separated for a sweep")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds for a sweep (overrides --seed), e.g. 0,1,2")
    p.add_argument("--recipe", choices=["lbfgs", "sgd"], default=None,
                   help="training recipe (default: lbfgs for logreg, sgd for mlp)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's SGD epochs")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adamw"], default=None,
                   help="minibatch optimizer (default: the model's recipe; the Recorder attaches to it)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a seeded, class-stratified subset of N training samples (quick runs)")
    p.add_argument("--checkpoints", type=int, default=10, help="trajectory checkpoints K")
    p.add_argument("--compression", default="int8", choices=["int8", "int4", "bf16", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--markdown", help="sweeps: write the summary as a markdown table here")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="run on MNIST-5k with an MLP, forget 30%%, every method",
                       description="`run` on mnist5k with the MLP, ratio 0.3 and every method.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="demo.json")
    p.add_argument("--plot", default="demo.png")
    p.set_defaults(func=_cmd_demo)

    from .audit import AUDIT_METHODS

    p = sub.add_parser("audit", help="U-LiRA: per-example likelihood-ratio attack on unlearning",
                       description="Hayes et al. 2024's U-LiRA: train N shadow models, each on half "
                                   "the pool with every target in exactly half of them; each shadow "
                                   "unlearns its targets with the method under test; per-example "
                                   "Gaussians of the logit-scaled true-class confidence (unlearned vs "
                                   "never seen), leave-one-shadow-out. Prints the attack's accuracy "
                                   "and AUC per method: 0.5 is ideal, retrain is the floor, original "
                                   "(no unlearning) the ceiling.")
    p.add_argument("--data", default="digits", help="digits, mnist5k, fashion-mnist or PATH.npz")
    p.add_argument("--model", default="logreg", help="logreg or mlp")
    p.add_argument("--methods", default="original,retrain,finetune",
                   help=f"comma-separated, from {','.join(AUDIT_METHODS)}")
    p.add_argument("--shadows", type=int, default=16, help="number of shadow models N (even, >= 6)")
    p.add_argument("--targets", type=int, default=128, help="number of target examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=["lbfgs", "sgd"], default=None,
                   help="training recipe (default: lbfgs for logreg, sgd for mlp)")
    p.add_argument("--epochs", type=int, default=None, help="override the SGD recipe's epochs")
    p.add_argument("--lr", type=float, default=None, help="override the SGD recipe's learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="override the recipe's weight decay")
    p.add_argument("--pool", type=int, default=None,
                   help="use this many training rows as the pool (each shadow trains on half)")
    p.add_argument("--train", choices=["auto", "vmap", "loop"], default="auto",
                   help="shadow training: vmap over stacked models (SGD) or one by one")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("bench", help="kernel or end-to-end unlearning benchmarks (JSON + PNG)")
    p.add_argument("what", choices=["kernels", "unlearn"])
    p.add_argument("--quick", action="store_true", help="a shorter run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="kernels: where to run")
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    p.set_defaults(func=_cmd_bench)

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
