"""Data-parallel recording, finalize and Mini-Unlearning on 2 gloo processes (127.0.0.1, one
thread each) against the same script run as one process.

One worker script runs the whole pipeline: train a 20-16-3 MLP on synthetic data with the
Recorder attached (full-batch SGD with momentum, so every rank computes bit-identical gradients,
as DDP's all-reduce gives every rank the same gradient), finalize, save the log, unlearn 15 of
200 samples in the one-shot, trajectory and refresh modes. Run with world 1 it takes the
single-process path (no process group); with world 2 the data-parallel one. The log is stored in
fp32 (``compression="fp32"``, block 32) so that the only differences between the two runs are the
order in which fp32 sums over samples are taken (each rank sums its share, the shares are added in
float64, then rounded to fp32 as in one process). The unlearned weights must agree to
``1e-5 * max(1, max|w|)`` (max abs difference, relative to the weights' scale, which reaches 2.7
here). The single-process run also unlearns the same forget set listed in reverse order: its
distance to the forward order measures what fp32 summation order alone moves (reported).

Every subprocess wait is bounded (``TIMEOUT``) and every collective has a 30 s timeout.
(A rank SIGKILLed during a collective save is covered by
tests/test_log_sharded.py::test_sigkill_of_one_rank_during_save_leaves_previous_log.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, run_ranks

TIMEOUT = 120
MODES = ("oneshot", "trajectory", "refresh")

_WORKER = r'''
import datetime, json, os, sys, torch
torch.set_num_threads(1)
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
other_log = sys.argv[5] if len(sys.argv) > 5 else None
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
from safetensors.torch import save_file
from mini_unlearn import GradientLog, Recorder, unlearn
from mini_unlearn.distributed import DistributedError, communicator
from mini_unlearn.errors import UnsupportedTrainingError

comm = communicator(timeout=30)
assert (comm is None) == (world == 1)
g = torch.Generator().manual_seed(0)
n, d = 200, 20
X = torch.randn(n, d, generator=g)
y = (X[:, :3].argmax(1) + (torch.rand(n, generator=g) < 0.1).long()) % 3
forget = torch.arange(3, 200, 13)  # 15 samples
keep = torch.ones(n, dtype=torch.bool); keep[forget] = False
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
loss_fn = torch.nn.functional.cross_entropy
opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5, weight_decay=1e-3)
rec = Recorder(net, checkpoints=4, total_steps=40, compression="fp32", block=32).attach(opt)
for _ in range(40):
    opt.zero_grad(); loss_fn(net(X), y).backward(); opt.step()
rec_bytes = rec.device_bytes() + sum(c.host_nbytes() for c in rec._closed)
log = rec.finalize((X, y), loss_fn, progress=False)

def flat_bytes(lg):
    b = 0
    for name in lg.entry_names:
        if lg.placement_of(name) == "flat":
            e = lg.raw(name)
            b += e.nbytes() if hasattr(e, "fmt") else e.numel() * e.element_size()
    for name in lg.row_lists:
        if lg.placement_of(name) == "flat":
            b += lg.rows(name).nbytes()
    return b

stats = dict(rank=rank, world=world, recorder_bytes=rec_bytes, log_bytes=log.nbytes(),
             history_bytes=flat_bytes(log), is_shard=log.is_shard)
log.save(os.path.join(out, f"log{world}"))
w0 = torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
res = {}
for mode in ("oneshot", "trajectory", "refresh"):
    kw = dict(retain=(X[keep], y[keep]), max_passes=3, tol=0.0) if mode == "refresh" else {}
    r = unlearn(net, log, indices=forget, loss_fn=loss_fn, mode=mode, **kw)
    res[mode] = torch.cat([p.detach().flatten() for p in r.model.parameters()])
    stats[mode + "_passes"] = r.passes
assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]), w0)
if world == 1:  # the same forget set in reverse order: fp32 summation order alone
    r = unlearn(net, log, indices=forget.flip(0), loss_fn=loss_fn, mode="oneshot")
    res["oneshot_reversed"] = torch.cat([p.detach().flatten() for p in r.model.parameters()])
if other_log is not None:  # a log saved by another number of processes, loaded here
    lg = GradientLog.load(other_log, net)
    stats["other_is_shard"] = lg.is_shard
    r = unlearn(net, lg, indices=forget, train_data=(X, y), loss_fn=loss_fn, mode="oneshot")
    res["oneshot_other"] = torch.cat([p.detach().flatten() for p in r.model.parameters()])
if world > 1:
    # every rank ends with the same model
    for k, v in res.items():
        v0 = v.clone(); comm.from_owner(v0, 0); assert torch.equal(v, v0), k
    # other methods are refused clearly under torchrun
    try:
        unlearn(net, log, indices=forget, loss_fn=loss_fn, method="finetune", retain=(X[keep], y[keep]))
    except UnsupportedTrainingError as e:
        assert "torchrun" in str(e)
    else:
        raise AssertionError("finetune ran under torchrun")
    # a rank that fails mid-unlearn (in its share of the trajectory's 2nd forget pass): every rank
    # raises the same DistributedError and no model is changed, in_place=True included
    calls = [0]
    def bad_loss(o, t):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise ValueError("injected failure")
        return loss_fn(o, t)
    try:
        unlearn(net, log, indices=forget, loss_fn=bad_loss, mode="trajectory", in_place=True)
    except DistributedError as e:
        assert e.failed == [1], e.failed
        assert (e.cause is not None) == (rank == 1)
        stats["failure"] = f"{type(e).__name__}: {e}"
    else:
        raise AssertionError("no error")
    assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]), w0)
    # DeltaGrad's full history: slices of every iterate, the batches gathered in rank order
    import copy
    net2 = copy.deepcopy(net)
    ra = Recorder(net2, checkpoints=0, history="all", compression="fp32", block=32)
    for s in range(2):
        b = torch.arange(10 * s, 10 * s + 10)
        net2.zero_grad(); loss_fn(net2(X[b]), y[b]).backward(); ra.step(0.1, indices=b[rank::world])
    la = ra.finalize((X, y), loss_fn, progress=False)
    assert la.get("all/batch_sizes").tolist() == [10, 10]
    assert la.get("all/batch_indices").tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9, 10, 12, 14, 16, 18,
                                                     11, 13, 15, 17, 19]
    assert la.local_shape("all/w0") == (la.hi - la.lo,) and la.row("all/g", 1).numel() == la.hi - la.lo
    assert torch.equal(la.full("all/w0"), torch.cat([p.detach().flatten() for p in net.parameters()]))
    # the same run without the failure still works afterwards (the group is in step)
    r = unlearn(net, log, indices=forget, loss_fn=loss_fn, mode="oneshot")
    assert torch.equal(torch.cat([p.detach().flatten() for p in r.model.parameters()]), res["oneshot"])
if rank == 0:
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(out, f"weights{world}.safetensors"))
with open(os.path.join(out, f"stats{world}-{rank}.json"), "w") as fh:
    json.dump(stats, fh)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
print("ok", rank, flush=True)
'''


def _launch(world: int, out: str, *extra: str) -> None:
    run_ranks(_WORKER, world, out, *extra, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The pipeline as one process, then on 2 gloo ranks (which also load the 1-process log)."""
    out = str(tmp_path_factory.mktemp("dist_unlearn"))
    _launch(1, out)
    _launch(2, out, os.path.join(out, "log1"))
    from safetensors.torch import load_file
    stats = {}
    for name in os.listdir(out):
        if name.startswith("stats"):
            with open(os.path.join(out, name)) as fh:
                s = json.load(fh)
            stats[(s["world"], s["rank"])] = s
    return out, load_file(os.path.join(out, "weights1.safetensors")), \
        load_file(os.path.join(out, "weights2.safetensors")), stats


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_unlearn_like_one_process(runs, mode):
    _, one, two, stats = runs
    err = float((one[mode] - two[mode]).abs().max())
    tol = 1e-5 * max(1.0, float(one[mode].abs().max()))
    order = float((one["oneshot"] - one["oneshot_reversed"]).abs().max())
    print(f"{mode}: max |w_2ranks - w_1process| = {err:.3g} (tolerance {tol:.3g}); "
          f"one process, reversed forget order: {order:.3g}")
    assert err <= tol, f"{mode}: max |w_2 - w_1| = {err:.3g} > {tol:.3g}"
    assert stats[(2, 0)][mode + "_passes"] == stats[(1, 0)][mode + "_passes"]


def test_unlearning_moved_the_weights(runs):
    out, one, _, _ = runs
    # the three modes give different, non-trivial updates (the comparison above is not vacuous)
    assert float((one["oneshot"] - one["trajectory"]).abs().max()) > 1e-4
    assert float((one["oneshot"] - one["refresh"]).abs().max()) > 1e-6


def test_per_rank_history_about_half(runs):
    _, _, _, stats = runs
    single = stats[(1, 0)]
    assert not single["is_shard"] and stats[(2, 0)]["is_shard"]
    for r in (0, 1):
        s = stats[(2, r)]
        assert s["history_bytes"] <= 0.55 * single["history_bytes"], s
        assert s["recorder_bytes"] <= 0.55 * single["recorder_bytes"], s
    # the shards' flat history tiles the single-process one exactly (fp32, no duplication)
    assert stats[(2, 0)]["history_bytes"] + stats[(2, 1)]["history_bytes"] == single["history_bytes"]


def test_one_process_log_loads_on_two_ranks(runs):
    _, one, two, stats = runs
    assert stats[(2, 0)]["other_is_shard"] is True
    assert float((two["oneshot_other"] - one["oneshot"]).abs().max()) <= 1e-5 * float(one["oneshot"].abs().max())


def test_two_rank_log_loads_in_one_process(runs):
    from mini_unlearn import GradientLog
    out, _, _, _ = runs
    two = GradientLog.load(os.path.join(out, "log2"))
    one = GradientLog.load(os.path.join(out, "log1"))
    assert not two.is_shard and two.meta["recorded_by_ranks"] == 2
    assert two.meta["n_train"] == one.meta["n_train"] == 200
    assert set(two.entry_names) == set(one.entry_names) and two.row_lists == one.row_lists
    for name in one.entry_names:
        if "/U_" in name:  # eigenvectors are defined up to sign/rotation: compare the factor U s Uᵀ
            s_name = name.replace("/U_", "/s_")
            a, b = ((lg.get(name) * lg.get(s_name)) @ lg.get(name).T for lg in (two, one))
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
        else:
            assert torch.allclose(two.get(name), one.get(name), rtol=1e-4, atol=1e-6), name
    for name in one.row_lists:  # recorded identically: bit-equal
        for k in range(one.num_rows(name)):
            assert torch.equal(two.row(name, k), one.row(name, k)), (name, k)


def test_failure_on_one_rank_raises_everywhere(runs):
    _, _, _, stats = runs
    for r in (0, 1):
        assert "rank(s) [1] failed" in stats[(2, r)]["failure"]
    assert "injected failure" in stats[(2, 1)]["failure"]


def _torchrun(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "mini_unlearn", "run", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_torchrun_cli_prints_the_table_once_and_rank0_writes(tmp_path):
    args = ["--data", "digits", "--model", "mlp", "--recipe", "sgd", "--epochs", "2", "--forget-ratio",
            "0.1", "--methods", "mini,retrain", "--json", "out.json", "--plot", "out.png"]
    p = _torchrun(args, str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("retrain noise floor") == 1 and p.stdout.count("wrote out.json") == 1
    res = json.loads((tmp_path / "out.json").read_text())
    assert set(res["methods"]) == {"mini", "retrain"} and res["methods"]["mini"]["mode"] == "trajectory"
    assert (tmp_path / "out.png").stat().st_size > 0
    bad = _torchrun(args[:-6] + ["--methods", "mini,finetune", "--json", "bad.json"], str(tmp_path))
    assert bad.returncode != 0 and "finetune have no data-parallel path" in bad.stderr
    assert not (tmp_path / "bad.json").exists()


_CONV_WORKER = r'''
import datetime, json, os, sys, torch
torch.set_num_threads(1)
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
from mini_unlearn import Recorder, unlearn
g = torch.Generator().manual_seed(0)
X = torch.randn(200, 1, 8, 8, generator=g)
y = X.flatten(1)[:, :3].argmax(1)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(256, 3))
loss_fn = torch.nn.functional.cross_entropy
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
rec = Recorder(net, checkpoints=4, total_steps=40, compression="fp32", block=32).attach(opt)
for _ in range(40):
    opt.zero_grad(); loss_fn(net(X), y).backward(); opt.step()
log = rec.finalize((X, y), loss_fn, progress=False)
res = unlearn(net, log, indices=torch.arange(3, 200, 13), train_data=(X, y), loss_fn=loss_fn)
if rank == 0:
    w = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
    with open(os.path.join(out, f"conv{world}.json"), "w") as fh:
        json.dump({"w": w.tolist(), "traces": log.meta["kfac_traces"]}, fh)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
print("ok", rank, flush=True)
'''


def test_two_ranks_calibrate_convolutions_like_one_process(tmp_path):
    """A convolution's trace calibration (curvature/conv2d.py) survives the all-reduce: on 2 ranks
    the traces are summed over both shares (each rank measures its own first samples, so they
    differ slightly from one process's) and the unlearned weights match one process's."""
    out = str(tmp_path)
    run_ranks(_CONV_WORKER, 1, out, timeout=TIMEOUT)
    run_ranks(_CONV_WORKER, 2, out, timeout=TIMEOUT)
    one, two = (json.load(open(os.path.join(out, f"conv{w}.json"))) for w in (1, 2))
    (ex1, mo1), (ex2, mo2) = one["traces"]["0"], two["traces"]["0"]
    assert ex1 > 0 and mo1 > 0 and abs(ex1 / mo1 - ex2 / mo2) < 0.05 * ex1 / mo1
    w1, w2 = torch.tensor(one["w"]), torch.tensor(two["w"])
    assert float((w1 - w2).norm() / w1.norm()) < 1e-3
