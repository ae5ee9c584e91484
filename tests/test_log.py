"""GradientLog: storage round trips, model plumbing, validation on load, crash safety, CLI."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from mini_unlearn import (GradientLog, LogFormatError, LogMismatchError, NonFiniteError, ops)
from mini_unlearn.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _full_log() -> GradientLog:
    g = torch.Generator().manual_seed(1)
    log = GradientLog.for_model(_model(), fmt="int8", block=32, meta={"n_train": 10, "lr": 0.1})
    for fmt in ops.FORMATS:
        log.put(f"v_{fmt}", torch.randn(log.dim, generator=g), fmt=fmt)
    log.put("mat", torch.randn(5, 8, generator=g))  # shape restored
    log.put("spec64", torch.rand(9, generator=g, dtype=torch.float64), exact=True)
    log.put("order", torch.randperm(11, generator=g), exact=True)
    for _ in range(3):
        log.append_row("g", torch.randn(log.dim, generator=g), fmt="int4")
        log.append_row("w", torch.randn(4, 4, generator=g), fmt="bf16")
    return log


def _stored_equal(a: GradientLog, b: GradientLog) -> None:
    assert a.param_names == b.param_names and a.shapes == b.shapes and a.dtypes == b.dtypes
    assert (a.fmt, a.block, a.all_trainable) == (b.fmt, b.block, b.all_trainable)
    assert a.meta == b.meta
    assert a.entry_names == b.entry_names and a.row_lists == b.row_lists
    for n in a.entry_names:
        ea, eb = a.raw(n), b.raw(n)
        assert a.shape_of(n) == b.shape_of(n)
        if isinstance(ea, ops.Compressed):
            assert (ea.fmt, ea.numel, ea.block) == (eb.fmt, eb.numel, eb.block)
            assert torch.equal(ea.data, eb.data)
            assert (ea.scales is None and eb.scales is None) or torch.equal(ea.scales, eb.scales)
        else:
            assert ea.dtype == eb.dtype and torch.equal(ea, eb)
    for n in a.row_lists:
        assert a.num_rows(n) == b.num_rows(n)
        ra, rb = a.rows(n), b.rows(n)
        assert torch.equal(ra.data, rb.data)
        assert (ra.scales is None and rb.scales is None) or torch.equal(ra.scales, rb.scales)


# ---- storage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ops.FORMATS)
def test_put_get_every_format(fmt):
    log = GradientLog(["a"], [(3, 37)], [torch.float32], fmt=fmt, block=32)
    x = torch.randn(3, 37)
    log.put("x", x)
    expect = ops.decompress(ops.compress(x, fmt, block=32)).reshape(3, 37)
    got = log.get("x")
    assert got.shape == (3, 37) and got.dtype == torch.float32
    assert torch.equal(got, expect)
    if fmt == "fp32":
        assert torch.equal(got, x)
    got[0, 0] = 1e6  # a fresh tensor: the log is untouched
    assert torch.equal(log.get("x"), expect)
    assert log.get("x", dtype=torch.float64).dtype == torch.float64


def test_exact_entries_bit_identical_and_roundtrip(tmp_path):
    log = _full_log()
    assert torch.equal(log.get("order"), log.raw("order")) and log.get("order").dtype == torch.int64
    path = tmp_path / "log"
    log.save(path)
    back = GradientLog.load(path, model=_model())
    _stored_equal(log, back)
    for n in log.entry_names:
        assert torch.equal(log.get(n), back.get(n))
    assert back.get("spec64").dtype == torch.float64
    assert back.get("mat").shape == (5, 8)
    assert back.meta["n_train"] == 10 and back.meta["format"] == "int8"
    import mini_unlearn
    assert back.meta["mini_unlearn_version"] == mini_unlearn.__version__
    # save over an existing log: replaced, one version directory left
    log.put("extra", torch.ones(4))
    log.save(path)
    assert GradientLog.load(path).get("extra").sum() == 4
    assert sorted(f for f in os.listdir(path) if f.startswith("v-")).__len__() == 1


def test_rows_roundtrip_and_ops():
    log = GradientLog(["a"], [(50,)], [torch.float32], fmt="int8", block=32)
    xs = [torch.randn(50) for _ in range(4)]
    for i, x in enumerate(xs):
        assert log.append_row("g", x) == i
    assert log.num_rows("g") == 4 and log.num_rows("nope") == 0
    r = log.rows("g")
    assert r.rows == 4 and r.fmt == "int8"
    dense = torch.stack([ops.decompress(ops.compress(x, "int8", block=32)) for x in xs])
    assert torch.equal(ops.decompress(r), dense)
    assert torch.equal(log.row("g", 2), dense[2])
    v = torch.randn(50)
    torch.testing.assert_close(ops.rows_dot(r, v), dense @ v, rtol=1e-5, atol=1e-5)
    assert log.rows("g", 1, 3).rows == 2
    with pytest.raises(ValueError):
        log.append_row("g", torch.randn(49))
    with pytest.raises(ValueError):
        log.append_row("g", torch.randn(50), fmt="int4")


def test_flatten_unflatten_load_into():
    m = _model(0)
    log = GradientLog.for_model(m)
    assert log.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert log.dim == 7 * 5 + 5 + 5 * 3 + 3 and log.all_trainable
    vec = log.flatten(m)
    assert vec.shape == (log.dim,) and vec.dtype == torch.float32
    assert torch.equal(vec[log.param_slice("0.bias")], m[0].bias.detach())
    parts = log.unflatten(vec)
    assert all(torch.equal(parts[n], p) for n, p in m.named_parameters())
    assert torch.equal(log.flatten(parts), vec)
    assert torch.equal(log.flatten(list(parts.values())), vec)
    m2 = _model(1)
    assert not torch.equal(log.flatten(m2), vec)
    log.load_into(m2, vec)
    assert torch.equal(log.flatten(m2), vec)
    x = torch.randn(2, 7)
    assert torch.equal(m(x), m2(x))
    # gradients
    m(x).sum().backward()
    gvec = log.flatten(m, grads=True)
    assert torch.equal(gvec[log.param_slice("2.bias")], m[2].bias.grad)
    # a subset of parameters
    sub = GradientLog.for_model(m, params=["2.weight"])
    assert sub.dim == 15 and not sub.all_trainable
    sub.check_model(m)


def test_check_model_mismatches():
    log = GradientLog.for_model(_model())
    log.check_model(_model(3))

    renamed = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    renamed = torch.nn.ModuleDict({"a": renamed[0], "b": renamed[2]})
    with pytest.raises(LogMismatchError, match="0.weight"):
        log.check_model(renamed)
    other_shape = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    with pytest.raises(LogMismatchError, match="2.weight.*shape"):
        log.check_model(other_shape)
    other_dtype = _model().double()
    with pytest.raises(LogMismatchError, match="0.weight.*dtype"):
        log.check_model(other_dtype)
    extra = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3),
                                torch.nn.Linear(3, 3))
    with pytest.raises(LogMismatchError, match="3.weight"):
        log.check_model(extra)
    with pytest.raises(LogMismatchError):
        log.flatten(other_shape)


def test_nonfinite_rejected():
    log = GradientLog(["a"], [(4,)], [torch.float32])
    with pytest.raises(NonFiniteError, match="anchor_g"):
        log.put("anchor_g", torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(NonFiniteError, match="spec"):
        log.put("spec", torch.tensor([float("inf")]), exact=True)
    with pytest.raises(NonFiniteError, match="grads"):
        log.append_row("grads", torch.tensor([0.0, float("-inf"), 0.0, 0.0]))
    assert log.entry_names == [] and log.num_rows("grads") == 0


def test_sizes_real():
    n = 1 << 16
    log = GradientLog(["a"], [(n,)], [torch.float32], fmt="int8", block=256)
    log.put("x", torch.randn(n))
    assert log.nbytes() == n + 4 * (n // 256)
    assert log.raw_nbytes() == 4 * n
    assert log.compression_ratio() == pytest.approx(4 / (1 + 4 / 256))
    assert 3.8 < log.compression_ratio() < 4.0
    log.append_row("g", torch.randn(n), fmt="int4")
    log.append_row("g", torch.randn(n), fmt="int4")
    assert log.nbytes() == n + n // 64 + 2 * (n // 2 + n // 64)
    log.put("b", torch.randn(n), fmt="bf16")
    log.put("e", torch.zeros(10, dtype=torch.float64), exact=True)
    assert log.raw_nbytes() == 4 * n * 4 + 80
    s = log.summary()
    assert "int4" in s and "compression ratio" in s and repr(log).startswith("GradientLog(")


# ---- validation on load ----------------------------------------------------------------------

def _saved(tmp_path):
    path = tmp_path / "log"
    _full_log().save(path)
    vdir = path / (path / "CURRENT").read_text().strip()
    return path, vdir


def test_truncated_file(tmp_path):
    path, vdir = _saved(tmp_path)
    f = vdir / "tensors-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LogFormatError, match="tensors-00000.safetensors.*truncated.*backup"):
        GradientLog.load(path)


def test_flipped_byte(tmp_path):
    path, vdir = _saved(tmp_path)
    f = vdir / "tensors-00000.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x10
    f.write_bytes(bytes(b))
    with pytest.raises(LogFormatError, match="tensors-00000.safetensors.*sha256"):
        GradientLog.load(path)


def test_flipped_byte_in_manifest(tmp_path):
    path, vdir = _saved(tmp_path)
    f = vdir / "manifest.json"
    text = f.read_text()
    f.write_text(text.replace('"lr": 0.1', '"lr": 0.3'))
    with pytest.raises(LogFormatError, match="manifest.json.*checksum"):
        GradientLog.load(path)


def test_missing_file(tmp_path):
    path, vdir = _saved(tmp_path)
    (vdir / "tensors-00000.safetensors").unlink()
    with pytest.raises(LogFormatError, match="tensors-00000.safetensors.*missing"):
        GradientLog.load(path)


def test_broken_manifest_json(tmp_path):
    path, vdir = _saved(tmp_path)
    f = vdir / "manifest.json"
    f.write_text(f.read_text()[:50])
    with pytest.raises(LogFormatError, match="manifest.json.*JSON"):
        GradientLog.load(path)


def test_wrong_version(tmp_path):
    path, vdir = _saved(tmp_path)
    f = vdir / "manifest.json"
    m = json.loads(f.read_text())
    m["format_version"] = 99
    f.write_text(json.dumps(m))
    with pytest.raises(LogFormatError, match="version 99.*upgrade"):
        GradientLog.load(path)


def test_not_a_log(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hi")
    with pytest.raises(LogFormatError, match="not a GradientLog"):
        GradientLog.load(tmp_path / "junk")
    with pytest.raises(LogFormatError, match="not a GradientLog"):
        GradientLog.load(tmp_path / "junk" / "a.txt")
    with pytest.raises(FileNotFoundError):
        GradientLog.load(tmp_path / "nothing")
    with pytest.raises(FileExistsError):  # save refuses to overwrite a foreign directory
        _full_log().save(tmp_path / "junk")
    path, _ = _saved(tmp_path)
    (path / "CURRENT").write_text("../../etc\n")
    with pytest.raises(LogFormatError, match="CURRENT"):
        GradientLog.load(path)


def test_load_checks_model(tmp_path):
    path, _ = _saved(tmp_path)
    with pytest.raises(LogMismatchError):
        GradientLog.load(path, model=_model().double())


# ---- crash safety ----------------------------------------------------------------------------

_BUILDER = r'''
import torch
from mini_unlearn import GradientLog

def build(i):
    g = torch.Generator().manual_seed(1000 + i)
    n = 400_000
    log = GradientLog(["w"], [(n,)], [torch.float32], fmt="int8", meta={"save_index": i})
    log.put("anchor", torch.randn(n, generator=g), fmt="fp32")
    log.put("grad", torch.randn(n, generator=g))
    for _ in range(3):
        log.append_row("hist", torch.randn(n, generator=g))
    return log
'''

# The subprocess imports torch once (the slow part), then for each round forks a worker that
# saves build(0), build(1), ... to one path in a loop, printing "saved i" after each save; the
# test SIGKILLs the worker at a random time and the subprocess reports its death.
_CHILD = _BUILDER + r"""
import os, sys
torch.set_num_threads(1)
print("ready", flush=True)
for line in sys.stdin:
    path = line.strip()
    pid = os.fork()
    if pid == 0:
        try:
            i = 0
            while True:
                build(i).save(path)
                print(f"saved {i}", flush=True)
                i += 1
        finally:
            os._exit(1)
    print(f"pid {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"dead {status}", flush=True)
"""


def test_sigkill_during_save_leaves_a_loadable_log(tmp_path):
    ns: dict = {}
    exec(_BUILDER, ns)
    build = ns["build"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    rng = random.Random(1234)
    rounds = 8
    n_mid = 0
    try:
        assert proc.stdout.readline().strip() == "ready"
        for r in range(rounds):
            path = tmp_path / f"log{r % 3}"  # paths are reused: later rounds overwrite old logs
            proc.stdin.write(f"{path}\n")
            proc.stdin.flush()
            head, pid = proc.stdout.readline().split()
            assert head == "pid"
            line = proc.stdout.readline()
            assert line.strip() == "saved 0", line  # a first version exists at path
            time.sleep(rng.uniform(0.0, 0.6))
            os.kill(int(pid), signal.SIGKILL)
            last = 0
            for line in proc.stdout:
                word, val = line.split()
                if word == "dead":
                    assert os.WIFSIGNALED(int(val)) and os.WTERMSIG(int(val)) == signal.SIGKILL
                    break
                last = int(val)
            log = GradientLog.load(path)
            i = log.meta["save_index"]
            print(f"round {r}: last finished save {last}, loaded {i}")
            assert i in (last, last + 1), (i, last)  # the last finished save, or the interrupted one
            n_mid += last > 0
            _stored_equal(log, build(i))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert n_mid > 0  # some kills came after completed overwrites, i.e. in the middle of a later one
    # the next save cleans up what the killed ones left behind
    for k in range(3):
        path = tmp_path / f"log{k}"
        build(99).save(path)
        assert GradientLog.load(path).meta["save_index"] == 99
        assert sorted(os.listdir(path))[0] == "CURRENT" and len(os.listdir(path)) == 2


# ---- command line ----------------------------------------------------------------------------

def test_cli_inspect(tmp_path, capsys):
    path, _ = _saved(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compression ratio" in out and "0.weight" in out and "int4" in out


def test_cli_bad_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["inspect", str(tmp_path / "missing")])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err
    path, vdir = _saved(tmp_path)
    (vdir / "tensors-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as ei:
        main(["inspect", str(path)])
    assert ei.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_python_dash_m(tmp_path, monkeypatch, capsys):
    import runpy
    monkeypatch.setattr(sys, "argv", ["mini_unlearn", "inspect", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as ei:
        runpy.run_module("mini_unlearn", run_name="__main__")
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
