"""Language-model unlearning benchmark: forget Shakespeare plays from a small GPT.

    PYTHONPATH=. python -m benchmarks.bench_lm [--optimizers momentum adamw] [--seeds 0] \
        [--rows-per-doc 32] [--epochs 6] [--methods mini mini+retain finetune ...] \
        [--json benchmarks/results/bench_lm.json] [--png benchmarks/results/bench_lm.png]
    PYTHONPATH=. python -m benchmarks.bench_lm --from-json benchmarks/results/bench_lm.json  # table + plot

Data: :func:`mini_unlearn.text.load_text` ("shakespeare", byte tokens, seq_len 64; one play or
poem = one document; 4 documents held out, never trained on). To keep one training near a
few minutes on 2 shared CPU cores, each document contributes its first ``--rows-per-doc`` sequences
(38 training documents x 32 = 1216 sequences, 4 held-out x 32 = 128).

Model: :class:`mini_unlearn.gpt.GPT`, d_model 64, 2 layers, 4 heads (137k parameters).
Training: ``default_recipe("gpt", optimizer=...)`` with ``epochs=--epochs`` (momentum: SGD
0.9, lr 0.1, 50 warm-up steps, cosine, clip 1.0; adamw: lr 3e-3, wd 0.1, ...), batch 32,
with ``Recorder(model, checkpoints=8)`` attached; ``finalize`` on the training rows.

Forget sets: 1 document, 10 % and 30 % of the training documents (a seeded choice).
Retraining: same recipe, same init, same batch sequence minus the forgotten rows
(``models.train(indices=...)``) -- the reference every method is compared with.

Per method: perplexity on the forgotten documents, on (a seeded sample of 384 rows of) the
retained documents and on the held-out documents; the loss attack and Min-K%-Prob (k = 20 %)
AUC of forgotten vs held-out sequences (:mod:`mini_unlearn.lm_eval`); seconds and speed-up
over retraining; the log's bytes. nabla_tau's ``val=``: the two sequences after the trained ones of every
training document (text never trained on, disjoint from the evaluation rows). A method that refuses (a typed error) is recorded with its
error, not dropped. If mini's linearity check refuses, the same call with
``linearity_limit=None`` is recorded as ``mini(nolin)`` -- a study, not a library answer.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import time

import torch

import mini_unlearn as mu
from mini_unlearn import lm_eval as E
from mini_unlearn import models as M
from mini_unlearn.gpt import lm_loss
from mini_unlearn.errors import MiniUnlearnError
from mini_unlearn.methods import METHODS
from mini_unlearn.text import load_text

ALL_METHODS = ["mini", "mini+retain", "finetune", "neggrad", "nabla_tau", "ga", "rl", "salun", "scrub"]
FRACTIONS = [("1 doc", None), ("10%", 0.10), ("30%", 0.30)]


def build_data(rows_per_doc: int, seq_len: int = 64) -> dict:
    """Training and held-out rows: the first ``rows_per_doc`` sequences of each document."""
    td = load_text("shakespeare", seq_len)
    tr = torch.cat([td.doc_rows(d)[:rows_per_doc] for d in td.train_docs])
    ho = torch.cat([td.doc_rows(d)[:rows_per_doc] for d in td.heldout_docs])
    va = torch.cat([td.doc_rows(d)[rows_per_doc:rows_per_doc + 2] for d in td.train_docs])
    return dict(td=td, X=td.X[tr], Y=td.Y[tr], doc=td.doc_ids[tr], Xh=td.X[ho], Yh=td.Y[ho],
                doch=td.doc_ids[ho], Xv=td.X[va], Yv=td.Y[va])


def forget_docs(train_docs: list[int], frac: float | None, seed: int) -> list[int]:
    """A seeded choice of 1 document (``frac=None``) or ``round(frac * len)`` documents."""
    g = torch.Generator().manual_seed(1000 + seed)
    k = 1 if frac is None else max(1, round(frac * len(train_docs)))
    perm = torch.randperm(len(train_docs), generator=g)[:k]
    return sorted(train_docs[i] for i in perm.tolist())


def measure(model, D: dict, f_idx: torch.Tensor, r_eval: torch.Tensor) -> dict:
    """Perplexities and membership AUCs of ``model`` (forget = rows ``f_idx`` of the training set)."""
    lf, mf = E.token_logprobs(model, D["X"][f_idx], D["Y"][f_idx])
    lr, mr = E.token_logprobs(model, D["X"][r_eval], D["Y"][r_eval])
    lh, mh = E.token_logprobs(model, D["Xh"], D["Yh"])
    return dict(ppl_forget=E.perplexity_of(lf, mf), ppl_retain=E.perplexity_of(lr, mr),
                ppl_heldout=E.perplexity_of(lh, mh),
                auc_loss=E.auc(E.sequence_loss_scores(lf, mf), E.sequence_loss_scores(lh, mh)),
                auc_mink=E.auc(E.min_k_prob_scores(lf, mf, 0.2), E.min_k_prob_scores(lh, mh, 0.2)),
                doc_ppl_forget={str(k): v for k, v in
                                E.doc_perplexities(lf, mf, D["doc"][f_idx]).items()})


def run_method(name: str, model, log, D: dict, f_idx, r_idx, recipe, seed: int) -> tuple:
    """``(result model or None, seconds, info dict)`` of one unlearning method."""
    method = "mini" if name.startswith("mini") else name
    kw: dict = dict(indices=f_idx, loss_fn=lm_loss, method=method, progress=False)
    if name != "mini" and name != "mini(nolin)":
        kw["retain"] = (D["X"][r_idx], D["Y"][r_idx])
    if name == "mini+retain":  # the retained repair (off by default since the directional calibration)
        kw["repair_epochs"] = 2
    if name == "mini(nolin)":
        kw["linearity_limit"] = None
    if method != "mini":
        params = inspect.signature(METHODS[method]).parameters
        if "recipe" in params:
            kw["recipe"] = recipe
        if "seed" in params:
            kw["seed"] = seed
        if "val" in params:  # nabla_tau: validation text never trained on (not the evaluation rows)
            kw["val"] = (D["Xv"], D["Yv"])
    t = time.perf_counter()
    try:
        res = mu.unlearn(model, log, **kw)
    except Exception as exc:  # a refusal is a result: record its type and message
        kind = "refused" if isinstance(exc, (MiniUnlearnError, ValueError)) else "crashed"
        return None, time.perf_counter() - t, dict(error=f"{type(exc).__name__}: {exc}"[:400], failure=kind)
    info = dict(mode=res.mode, passes=res.passes)
    return res.model, time.perf_counter() - t, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=["momentum"], choices=["momentum", "adamw", "sgd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rows-per-doc", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS)
    ap.add_argument("--fractions", nargs="+", default=[f for f, _ in FRACTIONS])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/bench_lm.json")
    ap.add_argument("--png", default="benchmarks/results/bench_lm.png")
    ap.add_argument("--from-json", default=None,
                    help="only redraw the plot and print the table of a saved result file")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as fh:
            saved = json.load(fh)
        if a.png:
            plot(saved, a.png)
        print(table(saved))
        return
    torch.set_num_threads(a.threads)
    D = build_data(a.rows_per_doc)
    td = D["td"]
    n = D["X"].shape[0]
    out = dict(config=dict(vars(a), n_train=n, n_heldout=int(D["Xh"].shape[0]),
                           train_docs=len(td.train_docs), heldout_docs=[td.doc_names[d] for d in td.heldout_docs],
                           model=dict(d_model=64, n_layers=2, n_heads=4, seq_len=64)), runs=[])

    def save() -> None:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)

    for opt in a.optimizers:
        recipe = dataclasses.replace(M.default_recipe("gpt", optimizer=opt), epochs=a.epochs)
        for seed in a.seeds:
            recipe = dataclasses.replace(recipe, seed=seed)

            def fresh(seed=seed):
                return M.make_model("gpt", 256, 256, seed=seed, d_model=64, n_layers=2, n_heads=4, seq_len=64)

            model = fresh()
            rec = mu.Recorder(model, checkpoints=a.checkpoints, total_steps=len(M.batch_schedule(n, recipe)))
            st = M.train(model, D["X"], D["Y"], recipe, optimizer_callback=rec.attach, final_objective=False)
            t = time.perf_counter()
            log = rec.finalize((D["X"], D["Y"]), lm_loss, progress=False)
            t_fin = time.perf_counter() - t
            print(f"[{opt} seed {seed}] trained {st['steps']} steps in {st['seconds']:.1f}s, finalize {t_fin:.1f}s, "
                  f"log {log.nbytes() / 2**20:.2f} MiB", flush=True)
            for fname, frac in FRACTIONS:
                if fname not in a.fractions:
                    continue
                docs = forget_docs(td.train_docs, frac, seed)
                f_idx = torch.nonzero(torch.isin(D["doc"], torch.tensor(docs))).view(-1)
                r_idx = torch.nonzero(~torch.isin(D["doc"], torch.tensor(docs))).view(-1)
                g = torch.Generator().manual_seed(seed)
                r_eval = r_idx[torch.randperm(r_idx.numel(), generator=g)[:384]].sort().values
                row = dict(optimizer=opt, seed=seed, forget=fname, forget_docs=[td.doc_names[d] for d in docs],
                           n_forget=int(f_idx.numel()), train_seconds=st["seconds"], finalize_seconds=t_fin,
                           history_bytes=log.nbytes(), methods={})
                row["methods"]["original"] = dict(measure(model, D, f_idx, r_eval), seconds=0.0)
                ref = fresh()
                rs = M.train(ref, D["X"], D["Y"], recipe, indices=r_idx, final_objective=False)
                row["methods"]["retrain"] = dict(measure(ref, D, f_idx, r_eval), seconds=rs["seconds"],
                                                 speedup=1.0)
                names = list(a.methods)
                i = 0
                while i < len(names):
                    name = names[i]
                    um, sec, info = run_method(name, model, log, D, f_idx, r_idx, recipe, seed)
                    if um is not None:
                        info.update(measure(um, D, f_idx, r_eval))
                    info.update(seconds=sec, speedup=rs["seconds"] / sec if sec > 0 else None)
                    row["methods"][name] = info
                    if name == "mini" and "LinearisationError" in info.get("error", ""):
                        names.insert(i + 1, "mini(nolin)")
                    msg = info.get("error") or " ".join(f"{k}={info[k]:.3f}" for k in
                                                         ("ppl_forget", "ppl_retain", "ppl_heldout", "auc_loss",
                                                          "auc_mink", "seconds"))
                    print(f"  {fname:6s} {name:12s} [{info.get('mode')}] {msg[:200]}", flush=True)
                    i += 1
                ref_m = row["methods"]["retrain"]
                print(f"  {fname:6s} retrain      ppl_forget={ref_m['ppl_forget']:.3f} "
                      f"ppl_retain={ref_m['ppl_retain']:.3f} ppl_heldout={ref_m['ppl_heldout']:.3f} "
                      f"auc_loss={ref_m['auc_loss']:.3f} auc_mink={ref_m['auc_mink']:.3f} "
                      f"seconds={ref_m['seconds']:.1f}", flush=True)
                out["runs"].append(row)
                save()
    save()
    if a.png:
        plot(out, a.png)
    print(table(out))


def table(out: dict) -> str:
    """Markdown table: per optimizer / forget set / method, means over seeds."""
    lines = ["| optimizer | forget | method | seeds | ppl forget | ppl retain | ppl held-out | AUC loss | AUC Min-K | "
             "seconds | speed-up |", "|" + "---|" * 11]
    keys: dict = {}
    for row in out["runs"]:
        for name, m in row["methods"].items():
            keys.setdefault((row["optimizer"], row["forget"], name), []).append(m)
    for (opt, fname, name), ms in keys.items():
        if any("error" in m for m in ms):
            err = next(m["error"] for m in ms if "error" in m)
            kind = next(m.get("failure", "refused") for m in ms if "error" in m)
            lines.append(f"| {opt} | {fname} | {name} | {len(ms)} | {kind}: {err.split(':')[0]} |  |  |  |  |  |  |")
            continue

        def mean(k):
            v = [m[k] for m in ms if m.get(k) is not None]
            return sum(v) / len(v) if v else float("nan")
        lines.append(f"| {opt} | {fname} | {name} | {len(ms)} | {mean('ppl_forget'):.3f} | {mean('ppl_retain'):.3f} | "
                     f"{mean('ppl_heldout'):.3f} | {mean('auc_loss'):.3f} | {mean('auc_mink'):.3f} | "
                     f"{mean('seconds'):.2f} | {mean('speedup'):.1f}x |".replace("nanx", "-"))
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    """Left: |ppl_forget - retraining's| per method and forget set (first optimizer, seed mean).
    Right: per-document perplexity of the forgotten documents, mini vs retraining vs original, on
    the largest forget set mini answered (without its linearity refusal)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if r["optimizer"] == out["runs"][0]["optimizer"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    fnames = list(dict.fromkeys(r["forget"] for r in runs))
    methods = [m for m in dict.fromkeys(k for r in runs for k in r["methods"]) if m != "retrain"]
    w = 0.8 / max(1, len(fnames))
    for j, fn in enumerate(fnames):
        vals = []
        for m in methods:
            d = [abs(r["methods"][m]["ppl_forget"] - r["methods"]["retrain"]["ppl_forget"])
                 for r in runs if r["forget"] == fn and "ppl_forget" in r["methods"].get(m, {})]
            vals.append(sum(d) / len(d) if d else math.nan)
        ax1.bar([i + j * w for i in range(len(methods))], vals, w, label=f"forget {fn}")
    ax1.set_xticks([i + w * (len(fnames) - 1) / 2 for i in range(len(methods))])
    ax1.set_xticklabels(methods, rotation=40, ha="right")
    ax1.set_yscale("log")
    ax1.set_ylabel("|ppl(forgotten) - retraining's|")
    ax1.set_title(f"{runs[0]['optimizer']}: distance to retraining (no bar = refused/crashed)")
    ax1.legend()
    ok = [r for r in runs if "doc_ppl_forget" in r["methods"].get("mini", {})]  # the largest set mini answered
    big = max(ok, key=lambda r: r["n_forget"]) if ok else [r for r in runs if r["forget"] == fnames[-1]][0]
    mname = next((m for m in ("mini", "mini(nolin)", "mini+retain") if "doc_ppl_forget" in big["methods"].get(m, {})),
                 None)
    docs = sorted(big["methods"]["retrain"]["doc_ppl_forget"], key=int)
    x = range(len(docs))
    for m, mk in (("original", "o"), ("retrain", "s"), (mname, "x")):
        if m is not None:
            ax2.plot(x, [big["methods"][m]["doc_ppl_forget"][d] for d in docs], mk, label=m)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(big["forget_docs"], rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("perplexity of the forgotten document")
    ax2.set_title(f"per document, forget {big['forget']} (seed {big['seed']})")
    ax2.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
