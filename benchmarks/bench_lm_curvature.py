"""Cost of the curvature pass on a small GPT with a large vocabulary, against one training epoch
(target: ≤ 3× an epoch), and the fidelity cost of the output-factor memory bound.

    python -m benchmarks.bench_lm_curvature [--vocab 5000] [--n 256] [--threads 1] \
        [--json benchmarks/results/bench_lm_curvature.json]

Data: synthetic token ids. The Shakespeare corpus is byte-level (V = 256), too small a
vocabulary for this question, so the ids are drawn from a Zipf(1.1) law over V = ``--vocab``
tokens (a fixed generator), ``--n`` sequences of 64 tokens, next-token targets.
Model: :class:`mini_unlearn.gpt.GPT`, d_model 64, 2 layers, 4 heads, untied head.

* ``epoch``: one epoch of SGD with momentum at batch 32 (forward, backward, step).
* ``pass_mc``: finalize's anchor + curvature pass with the Monte-Carlo Fisher (one draw; the
  default above 64 classes) at the same batch size, with the default memory bound
  (MAX_FACTOR_BYTES = 64 MiB: the head's [V, V] output factor is kept as its diagonal for
  V > 4096). The backward passes per batch are counted: 1 + mc_samples whatever V is.
* ``pass_anchor``: the gradient-only pass (no curvature) for reference.
* ``eigh``: the factor eigendecompositions finalize adds after the pass.
Each figure is process CPU time (``--threads 1``), the best of ``--repeats`` runs.

Fidelity of the memory bound (``fidelity``): a tiny GPT (V = 320, trained briefly with SGD +
weight decay) finalized twice, with a dense [V, V] head factor and with the bound forcing it
diagonal; the one-shot unlearning step of 8 forgotten sequences under each, and the head factor's
action on random matrices, compared.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import mini_unlearn as mu
from mini_unlearn import curvature as C
from mini_unlearn.gpt import GPT, GPTConfig, lm_loss


def zipf_tokens(n: int, T: int, V: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
    ids = torch.multinomial(p / p.sum(), n * (T + 1), replacement=True, generator=g).view(n, T + 1)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def best(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return min(out)


def cost(a) -> dict:
    V, T = a.vocab, 64
    X, Y = zipf_tokens(a.n, T, V)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, seq_len=T, d_model=64, n_layers=2, n_heads=4))
    layout = C.Layout.of(model)
    blocks, diag = C.kron_blocks(model, layout)

    def epoch():
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for i in range(0, a.n, a.batch):
            opt.zero_grad()
            lm_loss(m(X[i:i + a.batch]), Y[i:i + a.batch]).backward()
            opt.step()

    calls = []
    real = torch.autograd.grad

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    def pass_mc():
        C.data_pass(model, layout, (X, Y), lm_loss, curvature=True, blocks=blocks, diag_names=diag,
                    fisher="mc", mc_samples=1, batch_size=a.batch)

    def pass_anchor():
        C.data_pass(model, layout, (X, Y), lm_loss, batch_size=a.batch)

    t_epoch = best(epoch, a.repeats)
    t_mc = best(pass_mc, a.repeats)
    t_anchor = best(pass_anchor, a.repeats)
    torch.autograd.grad = counting
    try:
        s = C.data_pass(model, layout, (X, Y), lm_loss, curvature=True, blocks=blocks, diag_names=diag,
                        fisher="mc", mc_samples=1, batch_size=a.batch)
    finally:
        torch.autograd.grad = real
    t0 = time.process_time()
    for b in blocks:
        for m in (s.A[b.module], s.G[b.module]):
            if m.dim() == 2:
                C.eigh_psd(m / s.n)
    t_eigh = time.process_time() - t0
    head = next(b for b in blocks if b.module == "head")
    batches = -(-a.n // a.batch)
    return dict(vocab=V, n_sequences=a.n, seq_len=T, batch_size=a.batch, params=model.num_parameters(),
                data="synthetic Zipf(1.1) token ids (Shakespeare's byte vocabulary is only 256)",
                max_factor_bytes=C.MAX_FACTOR_BYTES, head_G_diagonal=head.g_diag,
                factor_floats=int(sum(t.numel() for t in list(s.A.values()) + list(s.G.values()))),
                dense_head_G_floats=V * V,
                epoch_s=t_epoch, pass_mc_s=t_mc, pass_anchor_s=t_anchor, eigh_s=t_eigh,
                pass_over_epoch=t_mc / t_epoch, finalize_over_epoch=(t_mc + t_eigh) / t_epoch,
                backwards_per_batch=len(calls) / batches)


def fidelity(threads: int) -> dict:
    V, T, n = 320, 16, 96
    X, Y = zipf_tokens(n, T, V, seed=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, seq_len=T, d_model=32, n_layers=1, n_heads=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 16):
            b = perm[i:i + 16]
            opt.zero_grad()
            lm_loss(model(X[b]), Y[b]).backward()
            opt.step()
    forget = torch.arange(8)
    out, steps, G = {}, {}, {}
    for tag, bound in (("dense", 2 ** 40), ("diagonal", 4 * (V - 1) ** 2)):
        m = copy.deepcopy(model)
        log = mu.Recorder(m, checkpoints=0, fisher="mc", max_factor_bytes=bound).finalize(
            (X, Y), lm_loss, weight_decay=1e-3, progress=False)
        assert ("kfac/head/U_G" in log) == (tag == "dense")
        res = mu.unlearn(m, log, indices=forget, loss_fn=lm_loss, mode="oneshot", progress=False)
        steps[tag] = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(res.model.parameters(),
                                                                               model.parameters())])
        with torch.no_grad():
            out[f"forget_loss_{tag}"] = float(lm_loss(res.model(X[forget]), Y[forget]))
        s = log.get("kfac/head/s_G")
        G[tag] = (log.get("kfac/head/U_G") * s) @ log.get("kfac/head/U_G").T if tag == "dense" else torch.diag(s)
    with torch.no_grad():
        out["forget_loss_original"] = float(lm_loss(model(X[forget]), Y[forget]))
    Mr = torch.randn(V, 33, generator=torch.Generator().manual_seed(2))
    out.update(vocab=V, params=model.num_parameters(),
               oneshot_step_rel_diff=float((steps["diagonal"] - steps["dense"]).norm() / steps["dense"].norm()),
               oneshot_step_cosine=float(steps["diagonal"] @ steps["dense"]
                                         / (steps["diagonal"].norm() * steps["dense"].norm())),
               head_G_action_rel_err=float(((G["diagonal"] - G["dense"]) @ Mr).norm() / (G["dense"] @ Mr).norm()),
               head_G_offdiag_frobenius_share=float((G["dense"] - torch.diag(G["dense"].diagonal())).norm()
                                                    / G["dense"].norm()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = dict(threads=a.threads, cost=cost(a), fidelity=fidelity(a.threads))
    print(json.dumps(res, indent=1))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
