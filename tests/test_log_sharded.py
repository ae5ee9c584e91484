"""Sharded GradientLog: slicing, reassembly, collective save across 2 gloo ranks on 127.0.0.1,
resharding load, per-rank size, crash safety under SIGKILL of one rank, validation, no pickle.

Multi-process tests start 2 worker subprocesses (``python -c``) that form a gloo process group
on 127.0.0.1 at a free port; every wait is bounded (workers and collectives time out)."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from mini_unlearn import GradientLog, LogFormatError, ops
from mini_unlearn.log import assign_owners, shard_range

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT = 60  # seconds for a whole 2-rank worker run (imports included)

# Shared by the tests and the worker subprocesses: a deterministic log dominated by flat rows.
_BUILD = r'''
import torch
from mini_unlearn import GradientLog

N_A, N_B = 69_001, 1_000  # dim 70,001: odd, so int4 and the last shard end inside a block


def empty(i=0):
    return GradientLog(["a", "b"], [(N_A,), (N_B,)], [torch.float32, torch.float32], fmt="int8",
                       block=256, meta={"save_index": i, "lr": 0.1})


def build(i=0, log=None):
    """Fill ``log`` (default: a fresh full log) with save ``i``'s history: whole vectors are given
    even to a shard, which keeps its slice."""
    log = empty(i) if log is None else log
    g = torch.Generator().manual_seed(100 + i)
    d = N_A + N_B
    log.put("anchor/w", torch.randn(d, generator=g), exact=True)
    log.put("anchor/g", torch.randn(d, generator=g), fmt="bf16")
    log.put("kfac/0/U_A", torch.randn(20, 20, generator=g), owner=0)
    log.put("kfac/1/s_A", torch.rand(20, generator=g, dtype=torch.float64), exact=True, owner=1)
    log.put("order", torch.randperm(50, generator=g), exact=True)
    for _ in range(5):
        log.append_row("ckpt/grad", torch.randn(d, generator=g))
        log.append_row("ckpt/wdiff", torch.randn(d, generator=g), fmt="int4")
        log.append_row("small", torch.randn(3, 3, generator=g), fmt="bf16")
    return log


def stored_equal(a, b):
    from mini_unlearn import ops
    assert a.param_names == b.param_names and (a.rank, a.world, a.lo, a.hi) == (b.rank, b.world, b.lo, b.hi)
    assert a.meta == b.meta, (a.meta, b.meta)
    assert a.entry_names == b.entry_names, (a.entry_names, b.entry_names)
    assert a.row_lists == b.row_lists
    for n in a.entry_names:
        ea, eb = a.raw(n), b.raw(n)
        assert a.shape_of(n) == b.shape_of(n) and a.placement_of(n) == b.placement_of(n), n
        if isinstance(ea, ops.Compressed):
            assert (ea.fmt, ea.numel, ea.block) == (eb.fmt, eb.numel, eb.block), n
            assert torch.equal(ea.data, eb.data), n
            assert (ea.scales is None and eb.scales is None) or torch.equal(ea.scales, eb.scales), n
        else:
            assert ea.dtype == eb.dtype and torch.equal(ea, eb), n
    for n in a.row_lists:
        assert a.num_rows(n) == b.num_rows(n)
        ra, rb = a.rows(n), b.rows(n)
        assert torch.equal(ra.data, rb.data), n
        assert (ra.scales is None and rb.scales is None) or torch.equal(ra.scales, rb.scales), n


def forbid_pickle():
    """Make every pickling, unpickling and torch.load raise in this process."""
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    class NoUnpickler:
        def __init__(self, *a, **k):
            boom()

    pickle.load = pickle.loads = pickle.dump = pickle.dumps = boom
    pickle.Unpickler = pickle.Pickler = NoUnpickler
    torch.load = boom
'''

_NS: dict = {}
exec(_BUILD, _NS)
build, empty, stored_equal, forbid_pickle = _NS["build"], _NS["empty"], _NS["stored_equal"], _NS["forbid_pickle"]

# Worker: rank `rank` of 2 joins a gloo group, then runs one mode.
_WORKER = _BUILD + r'''
import datetime, os, sys
import torch.distributed as dist
torch.set_num_threads(1)
mode, rank, world, port, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=30))
forbid_pickle()
if mode == "roundtrip":
    v1path = sys.argv[6]
    full = build(0)
    shard = build(0, empty(0).shard_of(rank, world))  # a Recorder's way: whole vectors in, slices kept
    stored_equal(shard, full.shard_of(rank, world))
    assert shard.is_shard and shard.nbytes() < 0.55 * full.nbytes()
    shard.save(path, timeout=30)
    # gathering helpers (collectives)
    for k in (0, 4):
        assert torch.equal(shard.full_row("ckpt/grad", k), full.row("ckpt/grad", k))
        assert torch.equal(shard.full_row("ckpt/wdiff", k), full.row("ckpt/wdiff", k))
    assert torch.equal(shard.full_row("small", 2), full.row("small", 2))
    assert torch.equal(shard.full("anchor/w"), full.get("anchor/w"))
    assert torch.equal(shard.full("anchor/g"), full.get("anchor/g"))
    assert torch.equal(shard.full("kfac/0/U_A"), full.get("kfac/0/U_A"))
    assert torch.equal(shard.full("kfac/1/s_A"), full.get("kfac/1/s_A"))
    stored_equal(shard.gather(), full)
    # loading inside the process group gives this rank's shard
    stored_equal(GradientLog.load(path), shard)
    stored_equal(GradientLog.load(v1path), full.shard_of(rank, world))  # a 1-process log, resharded
    # a save that fails on one rank (a flat entry only rank 1 has) raises on every rank; log unchanged
    broken = build(1, empty(1).shard_of(rank, world))
    if rank == 1:
        broken.put("extra", torch.zeros(N_A + N_B))
    try:
        broken.save(path, timeout=30)
    except Exception as exc:
        assert "'extra' is missing on rank 0" in str(exc), exc
    else:
        raise AssertionError("a save with a rank missing a flat entry succeeded")
    stored_equal(GradientLog.load(path), shard)
    print(f"ok {rank}", flush=True)
elif mode == "loop":  # save build(0), build(1), ... collectively until killed
    i = 0
    while True:
        build(i, empty(i).shard_of(rank, world)).save(path, timeout=20)
        if rank == 0:
            print(f"saved {i}", flush=True)
        i += 1
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(mode: str, *args: str, world: int = 2) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "-c", _WORKER, mode, str(r), str(world), port, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for r in range(world)]


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=10)


def _finish(procs: list[subprocess.Popen], timeout: float = WORKER_TIMEOUT) -> list[str]:
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"rank {r} failed (rc {p.returncode}):\n{err[-3000:]}"
            outs.append(out)
    finally:
        _kill_all(procs)
    return outs


def _rank_bytes(path) -> dict[int, int]:
    vdir = os.path.join(path, open(os.path.join(path, "CURRENT")).read().strip())
    m = json.load(open(os.path.join(vdir, "manifest.json")))
    out: dict[int, int] = {}
    for fd in m["files"]:
        out[fd.get("rank", 0)] = out.get(fd.get("rank", 0), 0) + os.path.getsize(os.path.join(vdir, fd["name"]))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A log saved collectively by 2 ranks (which also check gathers and loads in the group), and
    the same log saved by one process."""
    root = tmp_path_factory.mktemp("sharded")
    v1 = root / "single"
    build(0).save(v1)
    two = root / "two"
    outs = _finish(_start("roundtrip", str(two), str(v1)))
    assert [o.split() for o in outs] == [["ok", "0"], ["ok", "1"]]
    return two, v1


# ---- in memory -----------------------------------------------------------------------------------

def test_shard_range_balanced_aligned():
    for dim in (0, 1, 255, 256, 1000, 70_001):
        for world in (1, 2, 3, 7):
            rs = [shard_range(dim, r, world, 256) for r in range(world)]
            assert rs[0][0] == 0 and rs[-1][1] == dim
            assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))
            assert all(lo % 256 == 0 and (hi % 256 == 0 or hi == dim) for lo, hi in rs)
            sizes = [-(-(hi - lo) // 256) for lo, hi in rs]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_assign_owners_balances_cost():
    costs = [784 ** 3, 100 ** 3, 100 ** 3, 10 ** 3, 512 ** 3]
    owners = assign_owners(costs, 2)
    assert owners == [0, 1, 1, 1, 1]
    assert assign_owners(costs, 1) == [0] * 5 and assign_owners([], 3) == []
    assert sorted(assign_owners([1.0] * 6, 3)) == [0, 0, 1, 1, 2, 2]


def test_shards_reassemble():
    full = build(0)
    for world in (1, 2, 3):
        shards = [full.shard_of(r, world) for r in range(world)]
        stored_equal(GradientLog.from_shards(shards), full)
        for s in shards:
            lo, hi = s.lo, s.hi
            assert torch.equal(s.get("anchor/w"), full.get("anchor/w")[lo:hi])
            assert s.shape_of("anchor/w") == (full.dim,) and s.local_shape("anchor/w") == (hi - lo,)
            assert torch.equal(s.row("ckpt/wdiff", 2), full.row("ckpt/wdiff", 2)[lo:hi])
            assert torch.equal(s.get("order"), full.get("order"))
    s1 = full.shard_of(0, 2)
    assert "kfac/1/s_A" not in s1 and s1.placement_of("kfac/1/s_A") == 1
    with pytest.raises(KeyError, match="owned by rank 1"):
        s1.get("kfac/1/s_A")
    with pytest.raises(ValueError):
        s1.shard_of(0, 2)


def test_shard_codes_equal_compressing_the_slice():
    """A shard fed whole vectors keeps exactly the codes of compressing its slice alone, which are
    also the full log's codes for that range (blocks are never split)."""
    x = torch.randn(70_001)
    full = empty()
    full.append_row("g", x, fmt="int8")
    full.append_row("h", x, fmt="int4")
    for r in range(2):
        s = empty().shard_of(r, 2)
        s.append_row("g", x, fmt="int8")
        s.append_row("h", x, fmt="int4")
        s.append_row("g", x[s.lo:s.hi], fmt="int8")  # or given as the slice itself
        for name, fmt in (("g", "int8"), ("h", "int4")):
            c = ops.compress(x[s.lo:s.hi], fmt, block=256)
            got = s.rows(name)
            assert torch.equal(got.data[0], c.data) and torch.equal(got.scales[0], c.scales)
            assert torch.equal(s.row(name, 0), full.row(name, 0)[s.lo:s.hi])
        assert torch.equal(s.rows("g").data[1], s.rows("g").data[0])
    with pytest.raises(ValueError):
        empty().shard_of(0, 2).append_row("g", torch.randn(1000), placement="flat")


# ---- across processes ----------------------------------------------------------------------------

def test_two_rank_save_loads_whole_and_equals_single_process_log(saved, tmp_path):
    two, v1 = saved
    shutil.copytree(two, tmp_path / "two")
    two = tmp_path / "two"
    m = json.load(open(two / (two / "CURRENT").read_text().strip() / "manifest.json"))
    assert m["format_version"] == 2 and m["shards"]["world"] == 2
    assert {fd["rank"] for fd in m["files"]} == {0, 1}
    assert m["entries"]["kfac/1/s_A"]["placement"] == 1 and m["rows"]["ckpt/grad"]["placement"] == "flat"
    whole = GradientLog.load(two)
    assert not whole.is_shard
    stored_equal(whole, GradientLog.load(v1))
    stored_equal(whole, build(0))
    # saved again by one process: the old single-process format, loadable as before
    whole.save(two)
    assert json.load(open(two / (two / "CURRENT").read_text().strip() / "manifest.json"))["format_version"] == 1
    stored_equal(GradientLog.load(two), build(0))


def test_one_process_log_loads_as_shards_that_concatenate(saved):
    _, v1 = saved
    full = GradientLog.load(v1)
    for world in (2, 3):
        shards = [GradientLog.load(v1, rank=r, world=world) for r in range(world)]
        assert all(s.is_shard and s.world == world for s in shards)
        for name in ("anchor/w",):
            assert torch.equal(torch.cat([s.get(name) for s in shards]), full.get(name))
        for k in range(5):
            assert torch.equal(torch.cat([s.row("ckpt/grad", k) for s in shards]), full.row("ckpt/grad", k))
        stored_equal(GradientLog.from_shards(shards), full)


def test_reshard_two_to_three(saved):
    two, _ = saved
    shards = [GradientLog.load(two, rank=r, world=3) for r in range(3)]
    stored_equal(GradientLog.from_shards(shards), build(0))
    assert [s.placement_of("kfac/1/s_A") for s in shards] == [1, 1, 1]
    assert "kfac/1/s_A" in shards[1] and "kfac/0/U_A" in shards[0] and "kfac/0/U_A" not in shards[2]


def test_per_rank_bytes_about_half(saved):
    two, v1 = saved
    single = sum(_rank_bytes(v1).values())
    per_rank = _rank_bytes(two)
    ratios = [per_rank[r] / single for r in (0, 1)]
    print(f"per-rank history bytes / single-process: {ratios[0]:.4f}, {ratios[1]:.4f} (single {single} B)")
    assert max(ratios) <= 0.55
    full = build(0)
    assert max(full.shard_of(r, 2).nbytes() for r in (0, 1)) <= 0.55 * full.nbytes()


def test_corrupted_or_missing_shard_file(saved, tmp_path):
    two, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(two, bad)
    vdir = bad / (bad / "CURRENT").read_text().strip()
    f = vdir / "rank-00001-00000.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(LogFormatError, match="rank-00001-00000.safetensors.*sha256"):
        GradientLog.load(bad)
    with pytest.raises(LogFormatError, match="rank-00001"):
        GradientLog.load(bad, rank=1, world=2)
    f.write_bytes(bytes(b[:-10]))
    with pytest.raises(LogFormatError, match="truncated"):
        GradientLog.load(bad)
    f.unlink()
    with pytest.raises(LogFormatError, match="missing"):
        GradientLog.load(bad)
    # a manifest whose shard ranges were altered (and re-checksummed) is refused too
    shutil.rmtree(bad)
    shutil.copytree(two, bad)
    mp = vdir / "manifest.json"
    m = json.loads(mp.read_text())
    m["shards"]["ranges"][0][1] += 256
    m["shards"]["ranges"][1][0] += 256
    from mini_unlearn.log._format import manifest_checksum
    m["checksum"] = manifest_checksum(m)
    mp.write_text(json.dumps(m))
    with pytest.raises(LogFormatError, match="ranges"):
        GradientLog.load(bad)


def test_load_never_unpickles(saved, monkeypatch):
    two, v1 = saved

    def boom(*a, **k):
        raise AssertionError("pickle used while loading a log")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    GradientLog.load(two)
    GradientLog.load(two, rank=1, world=3)
    GradientLog.load(v1, rank=0, world=2)
    GradientLog.load(v1)


def test_sigkill_of_one_rank_during_save_leaves_previous_log(tmp_path):
    rng = random.Random(7)
    for victim in (1, 0):
        path = tmp_path / f"log{victim}"
        procs = _start("loop", str(path))
        watchdog = threading.Timer(WORKER_TIMEOUT, _kill_all, [procs])  # bounds the blocking reads
        watchdog.start()
        last = -1
        try:
            deadline = time.monotonic() + WORKER_TIMEOUT
            while last < 1:  # two finished saves: the kill lands on an overwrite
                assert time.monotonic() < deadline, "workers too slow"
                line = procs[0].stdout.readline()
                if not line:
                    pytest.fail(f"rank 0 died: {procs[0].stderr.read()[-3000:]}")
                last = int(line.split()[1])
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(procs[victim].pid, signal.SIGKILL)
            procs[victim].wait(timeout=10)
            # the survivor raises (peer gone) or is killed after a bounded wait
            try:
                procs[1 - victim].wait(timeout=30)
            except subprocess.TimeoutExpired:
                procs[1 - victim].kill()
            out, _ = procs[0].communicate(timeout=10)
            for line in out.split("\n"):
                if line.startswith("saved"):
                    last = int(line.split()[1])
        finally:
            watchdog.cancel()
            _kill_all(procs)
        log = GradientLog.load(path)
        i = log.meta["save_index"]
        print(f"killed rank {victim}: last finished save {last}, loaded {i}")
        assert i in (last, last + 1), (i, last)  # the last finished save, or the interrupted one
        stored_equal(log, build(i))
        # a later save (one process) cleans up what the killed one left behind
        build(99).save(path)
        assert GradientLog.load(path).meta["save_index"] == 99
        assert sorted(os.listdir(path))[0] == "CURRENT" and len(os.listdir(path)) == 2


def test_more_ranks_than_blocks_gives_empty_shards(tmp_path):
    log = GradientLog(["w"], [(100,)], [torch.float32], fmt="int4", block=32)
    log.put("a", torch.randn(100))
    log.put("e", torch.randn(100), exact=True)
    log.append_row("r", torch.randn(100))
    log.save(tmp_path / "t")
    shards = [GradientLog.load(tmp_path / "t", rank=r, world=5) for r in range(5)]
    assert [(s.lo, s.hi) for s in shards] == [(0, 0), (0, 32), (32, 64), (64, 96), (96, 100)]
    assert shards[0].get("a").shape == (0,) and shards[0].row("r", 0).shape == (0,)
    stored_equal(GradientLog.from_shards(shards), log.shard_of(0, 1))
