"""Training recipes: train accuracy (memorisation), test accuracy and wall time of a model kind
trained with its default recipe, and the byte-level GPT on Shakespeare with its perplexities.

    python -m benchmarks.bench_recipes image --data mnist5k --model mlp --optimizer momentum
    python -m benchmarks.bench_recipes image --data fashion-mnist --model resnet --subset 1000
    python -m benchmarks.bench_recipes image --data fashion-mnist --model resnet --optimizer adamw --overhead-steps 48
    python -m benchmarks.bench_recipes gpt [--max-steps 1000]

Prints one line per run (and ``--json PATH`` writes it). Threads: 2 (``--threads``).
``--overhead-steps S`` also measures the Recorder's cost per training step: the recipe's first S
steps with ``Recorder(checkpoints=10, total_steps=...)`` attached to the optimizer against
the same steps without it, interleaved, best of 3 each (``record_overhead`` = ratio − 1).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mini_unlearn import models as M
from mini_unlearn.data import load_dataset, train_subset


def _accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(X[i:i + 2048]).argmax(1) for i in range(0, len(X), 2048)])
    return float(pred.eq(y).float().mean())


def run_image(data: str, model: str, optimizer: str | None, subset: int | None,
              epochs: int | None, seed: int = 0) -> dict:
    """Train ``model`` on ``data`` (optionally a stratified subset) with its default recipe."""
    ds = load_dataset(data, seed=seed)
    if subset:
        ds = train_subset(ds, subset, seed=seed)
    recipe = M.default_recipe(model, optimizer=optimizer)
    if epochs:
        recipe.epochs = epochs
    net = M.make_model(model, ds.num_features, ds.num_classes, seed=seed)
    stats = M.train(net, ds.X_train, ds.y_train, recipe)
    return {"data": ds.name, "model": model, "recipe": recipe.to_dict(),
            "train_acc": _accuracy(net, ds.X_train, ds.y_train),
            "test_acc": _accuracy(net, ds.X_test, ds.y_test),
            "seconds": stats["seconds"], "steps": stats["steps"]}


def record_overhead(data: str, model: str, optimizer: str | None, subset: int | None,
                    steps: int, seed: int = 0) -> dict:
    """Seconds per training step of ``model``'s recipe with and without a Recorder attached."""
    import mini_unlearn as mu

    ds = load_dataset(data, seed=seed)
    if subset:
        ds = train_subset(ds, subset, seed=seed)
    recipe = M.default_recipe(model, optimizer=optimizer)
    total = len(M.batch_schedule(ds.n_train, recipe))
    recipe.max_steps = steps

    def one(record: bool) -> float:
        net = M.make_model(model, ds.num_features, ds.num_classes, seed=seed)
        rec = mu.Recorder(net, checkpoints=10, total_steps=total) if record else None
        t0 = time.perf_counter()
        M.train(net, ds.X_train, ds.y_train, recipe, final_objective=False,
                optimizer_callback=rec.attach if rec is not None else None)
        return (time.perf_counter() - t0) / steps

    one(False), one(True)  # warm up
    pairs = [(one(False), one(True)) for _ in range(3)]  # interleaved: load drifts hit both
    plain, rec = min(p for p, _ in pairs), min(r for _, r in pairs)
    return {"steps": steps, "step_seconds_plain": plain, "step_seconds_recorded": rec,
            "record_overhead": rec / plain - 1.0}


def run_gpt(seq_len: int = 64, max_steps: int | None = None, eval_seqs: int = 2000,
            seed: int = 0) -> dict:
    """Train the default-size GPT on the Shakespeare training documents with the default AdamW
    recipe; perplexity on ``eval_seqs`` random training and held-out sequences."""
    from mini_unlearn.gpt import perplexity
    from mini_unlearn.text import load_text

    td = load_text(seq_len=seq_len, seed=seed)
    (Xtr, Ytr, _), (Xho, Yho, _) = td.split()
    recipe = M.default_recipe("gpt")
    if max_steps:
        recipe.max_steps = max_steps
    net = M.make_model("gpt", 256, 256, seed=seed, seq_len=seq_len)
    g = torch.Generator().manual_seed(seed + 1)
    ev = torch.randperm(Xtr.shape[0], generator=g)[:eval_seqs]
    eh = torch.randperm(Xho.shape[0], generator=g)[:eval_seqs]
    ppl0 = perplexity(net, Xtr[ev], Ytr[ev])
    stats = M.train(net, Xtr, Ytr, recipe, final_objective=False)
    return {"model": "gpt", "params": sum(p.numel() for p in net.parameters()),
            "recipe": recipe.to_dict(), "seconds": stats["seconds"], "steps": stats["steps"],
            "init_ppl": ppl0, "train_ppl": perplexity(net, Xtr[ev], Ytr[ev]),
            "heldout_ppl": perplexity(net, Xho[eh], Yho[eh]),
            "heldout_docs": [td.doc_names[i] for i in td.heldout_docs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    im = sub.add_parser("image")
    im.add_argument("--data", default="mnist5k")
    im.add_argument("--model", default="mlp")
    im.add_argument("--optimizer", default=None, choices=list(M.OPTIMIZERS))
    im.add_argument("--subset", type=int, default=None)
    im.add_argument("--epochs", type=int, default=None)
    im.add_argument("--overhead-steps", type=int, default=0,
                    help="also measure the Recorder's cost per step over this many steps")
    gp = sub.add_parser("gpt")
    gp.add_argument("--seq-len", type=int, default=64)
    gp.add_argument("--max-steps", type=int, default=None)
    for q in (im, gp):
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = (run_image(a.data, a.model, a.optimizer, a.subset, a.epochs) if a.what == "image"
           else run_gpt(a.seq_len, a.max_steps))
    if a.what == "image" and a.overhead_steps:
        res["overhead"] = record_overhead(a.data, a.model, a.optimizer, a.subset, a.overhead_steps)
    res["wall_seconds"] = time.perf_counter() - t0
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
