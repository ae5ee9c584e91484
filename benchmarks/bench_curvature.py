"""Cost of the curvature pass (finalize's anchor + curvature pass) on a small BatchNorm CNN,
against one training epoch of the same model (docs/math.md; target: ≤ 2× an epoch).

    python -m benchmarks.bench_curvature [--n 2000] [--threads 1] [--json curv.json]

Model: conv16-BN-ReLU-conv32-BN-ReLU-maxpool4-Linear on 28×28 MNIST-5k images (train mode,
batch statistics). The epoch is SGD with momentum at batch 64; the pass runs at finalize's
batch size for such a model (training's, 64: ``curvature.pass_batch_size``) with each
output-side estimator: the Monte-Carlo Fisher (one backward per draw; what ``fisher="auto"``
picks for convolutional nets), the empirical Fisher (no extra backward) and the exact per-class
GGN (one backward per class), each with the convolutions' trace calibration as finalize measures
it (``traces=True``: exact per-sample curvature traces on 128 of the images). Each figure is the process CPU time (``--threads 1``: immune to other load on a shared
machine), the best of ``--repeats`` runs. Also reports the anchor-only pass
(gradient and loss, no curvature), the factor eigendecompositions finalize adds, the MC
Fisher's deviation from the exact GGN, and the deviation of KFC's A on a sub-grid of positions
(``Conv2dRule.max_positions``) from A over every position."""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from mini_unlearn import curvature as C
from mini_unlearn.data import load_dataset


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(4), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def best(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.process_time()  # CPU time: robust on a shared machine (one thread by default)
        fn()
        out.append(time.process_time() - t)
    return min(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="training samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mc-samples", type=int, default=1)
    ap.add_argument("--pass-batch", type=int, default=64, help="the pass's batch size (finalize's batch_size)")
    ap.add_argument("--fishers", default="mc,empirical,ggn")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds = load_dataset("mnist5k", seed=0)
    X = ds.X_train[:a.n].reshape(-1, 1, 28, 28).float()
    y = ds.y_train[:a.n]
    model = make_cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # learns (loss 0.26 after 2 epochs); 0.05 kills every unit

    def epoch():
        perm = torch.randperm(a.n, generator=torch.Generator().manual_seed(0))
        for s in range(0, a.n, 64):
            i = perm[s:s + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[i]), y[i]).backward()
            opt.step()

    epoch()  # warm-up, and a model that has trained a little
    res = {"n": a.n, "threads": a.threads, "pass_batch": a.pass_batch, "params": sum(p.numel() for p in model.parameters())}
    res["epoch_s"] = best(epoch, a.repeats)
    layout = C.Layout.of(model)
    blocks, diag = C.kron_blocks(model, layout)
    res["blocks"] = [b.module for b in blocks]
    res["diag_params"] = diag
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res["anchor_only_s"] = best(lambda: C.data_pass(model, layout, (X, y), F.cross_entropy,
                                                               batch_size=a.pass_batch), a.repeats)
    sums = {}
    for fisher in a.fishers.split(","):
        def run(fisher=fisher):
            sums[fisher] = C.data_pass(model, layout, (X, y), F.cross_entropy, curvature=True, blocks=blocks,
                                       diag_names=diag, fisher=fisher, mc_samples=a.mc_samples,
                                       batch_size=a.pass_batch, traces=True)  # as finalize runs it
        res[f"pass_{fisher}_s"] = best(run, a.repeats)
        res[f"pass_{fisher}_x_epoch"] = res[f"pass_{fisher}_s"] / res["epoch_s"]
    res["buffers_untouched"] = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    s = next(iter(sums.values()))
    res["eigh_s"] = best(lambda: [C.eigh_psd(getattr(s, side)[b.module] / s.n)
                                  for b in blocks for side in ("A", "G")], 1)
    if "ggn" in sums and "mc" in sums:  # fidelity of the cheap estimator to the exact GGN
        g, m = sums["ggn"], sums["mc"]
        res["mc_vs_ggn_rel_G"] = {b.module: float((m.G[b.module] - g.G[b.module]).norm() / g.G[b.module].norm())
                                  for b in blocks}
        res["mc_vs_ggn_rel_diag"] = float((m.diag - g.diag).norm() / g.diag.norm())
    # KFC's A on a sub-grid of positions against all positions (same samples)
    from mini_unlearn.curvature.conv2d import Conv2dRule

    rule = C.rule_for(nn.Conv2d(1, 1, 1))
    cap = rule.max_positions
    rule.max_positions = None
    try:
        full = C.data_pass(model, layout, (X, y), F.cross_entropy, curvature=True, blocks=blocks,
                           fisher="empirical", batch_size=a.pass_batch)
    finally:
        rule.max_positions = cap
    res["conv_A_subgrid_max_positions"] = Conv2dRule.max_positions
    res["conv_A_subgrid_rel_fro"] = {b.module: float((s.A[b.module] - full.A[b.module]).norm() / full.A[b.module].norm())
                                     for b in blocks if isinstance(dict(model.named_modules())[b.module], nn.Conv2d)}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
