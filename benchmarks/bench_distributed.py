"""Data-parallel recording and Mini-Unlearning: 1 process against 2 gloo processes (127.0.0.1,
one thread each) on the mnist5k MLP (784-128-10, 101,898 parameters).

    python -m benchmarks.bench_distributed --json benchmarks/results/bench_distributed.json \
        --plot benchmarks/results/bench_distributed.png

Each configuration trains the MLP with SGD (momentum 0.9, batch 128, weight decay 5e-4) while
a Recorder (K = 10, int8) is attached: in one process on the whole batch; on 2 ranks under
DistributedDataParallel, each rank on its half of every batch (the gradients are averaged by
DDP, so both configurations take the same steps up to fp32 rounding). Then ``finalize`` (the
anchor + K-FAC pass over the training data: each rank over its half), a collective ``save`` of
the log, and the one-shot and trajectory unlearning of 10% of the training set (seeded).

Per rank it reports the wall time of every phase (the slowest rank's, as every phase ends in a
collective), the process's peak resident set size (``ru_maxrss``, mostly the torch runtime),
the bytes the Recorder holds at the end of training (open segment + compressed closed segments,
per rank), the bytes of the log this rank holds and saves (and of its flat history part:
anchors and checkpoint rows), and the distance between the weights unlearned by 1 and by 2
processes. On this 2-core machine 2 ranks share the cores with nothing else of ours, so times
show the communication overhead more than a speed-up."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _worker(rank: int, world: int, port: str, out: str, epochs: int) -> None:
    import torch
    torch.set_num_threads(1)
    rss0 = _rss()
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mini_unlearn import Recorder, unlearn
    from mini_unlearn import models as M
    from mini_unlearn.data import forget_split, load_dataset

    def sync():
        if world > 1:
            dist.barrier()

    ds = load_dataset("mnist5k", seed=0)
    X, y = ds.X_train, ds.y_train
    n = X.shape[0]
    net = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
    model = DDP(net) if world > 1 else net
    loss_fn = torch.nn.functional.cross_entropy
    bs = 128
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = [order[s:s + bs] for e in range(epochs) for s in range(0, n, bs)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rec = Recorder(model, checkpoints=10, total_steps=len(batches), compression="int8").attach(opt)
    times = {}
    sync()
    t = time.perf_counter()
    for b in batches:
        mine = b[rank::world]  # this rank's half of the batch; DDP averages the halves' gradients
        opt.zero_grad()
        loss_fn(model(X[mine]), y[mine]).backward()
        opt.step()
    sync()
    times["train"] = time.perf_counter() - t
    rec_bytes = rec.device_bytes() + sum(c.host_nbytes() for c in rec._closed)
    t = time.perf_counter()
    log = rec.finalize((X, y), loss_fn, progress=False)
    sync()
    times["finalize"] = time.perf_counter() - t
    t = time.perf_counter()
    log.save(os.path.join(out, f"log{world}"))
    times["save"] = time.perf_counter() - t
    f, _ = forget_split(n, 0.1, seed=1)
    weights = {}
    for mode in ("oneshot", "trajectory"):
        sync()
        t = time.perf_counter()
        r = unlearn(net, log, indices=f, loss_fn=loss_fn, mode=mode)
        sync()
        times[mode] = time.perf_counter() - t
        weights[mode] = torch.cat([p.detach().reshape(-1) for p in r.model.parameters()])
    flat = sum((log.raw(k).nbytes() if hasattr(log.raw(k), "fmt") else log.raw(k).numel() * log.raw(k).element_size())
               for k in log.entry_names if log.placement_of(k) == "flat")
    flat += sum(log.rows(k).nbytes() for k in log.row_lists if log.placement_of(k) == "flat")
    stats = dict(rank=rank, world=world, seconds=times, peak_rss_bytes=_rss(), rss_after_import_bytes=rss0,
                 recorder_bytes=rec_bytes, log_bytes=log.nbytes(), history_bytes=flat,
                 log_range=[log.lo, log.hi], dim=log.dim, steps=len(batches))
    with open(os.path.join(out, f"stats-{world}-{rank}.json"), "w") as fh:
        json.dump(stats, fh)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, f"weights-{world}.safetensors"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out: str, epochs: int, timeout: float) -> float:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    port = str(_free_port())
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world), port,
                               out, str(epochs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    try:
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=timeout)
            if p.returncode:
                raise RuntimeError(f"world {world} rank {r} failed:\n{err[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--quick", action="store_true", help="1 epoch instead of 3")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    args = ap.parse_args(argv)
    from safetensors.torch import load_file

    epochs = 1 if args.quick else 3
    result = {"model": "mlp 784-128-10 (mnist5k)", "epochs": epochs, "batch": 128, "checkpoints": 10,
              "compression": "int8", "backend": "gloo, 127.0.0.1, 1 thread per rank", "runs": {}}
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):  # one configuration at a time (the machine has 2 cores)
            wall = _launch(world, out, epochs, args.timeout)
            ranks = []
            for r in range(world):
                with open(os.path.join(out, f"stats-{world}-{r}.json")) as fh:
                    ranks.append(json.load(fh))
            result["runs"][str(world)] = {"wall_seconds_incl_startup": wall, "ranks": ranks}
        w1, w2 = load_file(os.path.join(out, "weights-1.safetensors")), load_file(os.path.join(out, "weights-2.safetensors"))
    one = result["runs"]["1"]["ranks"][0]
    result["two_vs_one"] = {
        "history_bytes_ratio_per_rank": [r["history_bytes"] / one["history_bytes"] for r in result["runs"]["2"]["ranks"]],
        "log_bytes_ratio_per_rank": [r["log_bytes"] / one["log_bytes"] for r in result["runs"]["2"]["ranks"]],
        "recorder_bytes_ratio_per_rank": [r["recorder_bytes"] / one["recorder_bytes"] for r in result["runs"]["2"]["ranks"]],
        "unlearned_rel_l2_difference": {m: float((w2[m] - w1[m]).norm() / w1[m].norm()) for m in w1},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    print(format_table(result))
    print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _slowest(run: dict, phase: str) -> float:
    return max(r["seconds"][phase] for r in run["ranks"])


PHASES = ("train", "finalize", "save", "oneshot", "trajectory")


def format_table(result: dict) -> str:
    lines = [f"{'processes':>9s} {'rank':>4s}" + "".join(f"{p + ' s':>13s}" for p in PHASES)
             + f"{'recorder B':>12s}{'log B':>10s}{'history B':>11s}{'peak RSS MiB':>14s}"]
    for world, run in result["runs"].items():
        for r in run["ranks"]:
            lines.append(f"{world:>9s} {r['rank']:>4d}" + "".join(f"{r['seconds'][p]:>13.3f}" for p in PHASES)
                         + f"{r['recorder_bytes']:>12,d}{r['log_bytes']:>10,d}{r['history_bytes']:>11,d}"
                         f"{r['peak_rss_bytes'] / 2**20:>14.1f}")
    c = result["two_vs_one"]
    lines.append("2 ranks / 1 process, per rank: history bytes "
                 + ", ".join(f"{x:.3f}" for x in c["history_bytes_ratio_per_rank"])
                 + "; log bytes " + ", ".join(f"{x:.3f}" for x in c["log_bytes_ratio_per_rank"])
                 + "; recorder bytes " + ", ".join(f"{x:.3f}" for x in c["recorder_bytes_ratio_per_rank"]))
    lines.append("unlearned weights, 2 ranks vs 1 process (rel-L2): "
                 + ", ".join(f"{m} {v:.2e}" for m, v in c["unlearned_rel_l2_difference"].items()))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    worlds = list(result["runs"])
    width = 0.8 / len(worlds)
    for i, w in enumerate(worlds):
        run = result["runs"][w]
        a.bar([j + i * width for j in range(len(PHASES))], [_slowest(run, p) for p in PHASES], width,
              label=f"{w} process{'es' if w != '1' else ''}")
    a.set_xticks([j + width * (len(worlds) - 1) / 2 for j in range(len(PHASES))], PHASES)
    a.set_ylabel("seconds (slowest rank)")
    a.set_title("wall time per phase")
    a.legend()
    labels, rec, hist, logb = [], [], [], []
    for w in worlds:
        for r in result["runs"][w]["ranks"]:
            labels.append(f"{w}p r{r['rank']}")
            rec.append(r["recorder_bytes"] / 2**20)
            hist.append(r["history_bytes"] / 2**20)
            logb.append(r["log_bytes"] / 2**20)
    x = range(len(labels))
    b.bar([i - 0.27 for i in x], rec, 0.27, label="recorder (end of training)")
    b.bar(list(x), hist, 0.27, label="log: flat history")
    b.bar([i + 0.27 for i in x], logb, 0.27, label="log: total")
    b.set_xticks(list(x), labels)
    b.set_ylabel("MiB per rank")
    b.set_title("per-rank bytes")
    b.legend()
    fig.suptitle(f"{result['model']}, {result['epochs']} epochs, K={result['checkpoints']}, {result['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit(main())
