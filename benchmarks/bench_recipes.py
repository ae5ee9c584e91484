"""Training recipes: train accuracy (memorisation), test accuracy and wall time of a model kind
trained with its default recipe, and the byte-level GPT on Shakespeare with its perplexities.

    python -m benchmarks.bench_recipes image --data mnist5k --model mlp --optimizer momentum
    python -m benchmarks.bench_recipes image --data fashion-mnist --model resnet --subset 1000
    python -m benchmarks.bench_recipes gpt [--max-steps 1000]

Prints one line per run (and ``--json PATH`` writes it). Threads: 2 (``--threads``).
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
    res["wall_seconds"] = time.perf_counter() - t0
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
