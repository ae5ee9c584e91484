"""Shared test helpers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vec(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of a model as one flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def acc(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, world: int, *args: str, timeout: float, what: str = "") -> None:
    """``python -c worker RANK WORLD PORT *args`` for every rank (one thread each, the repository on
    PYTHONPATH); each must exit 0 and print ``ok RANK`` within ``timeout`` seconds. Stragglers are
    killed. A failed launch is tried once more on a fresh port (an intermittent rank failure was
    seen about once in five full suites and not reproduced alone); both errors are reported if
    the second fails too."""
    first = _launch_ranks(worker, world, args, timeout, what)
    if first is None:
        return
    second = _launch_ranks(worker, world, args, timeout, what)
    assert second is None, f"{first}\n--- retried on a fresh port ---\n{second}"


def _launch_ranks(worker: str, world: int, args, timeout: float, what: str) -> str | None:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", worker, str(r), str(world), port, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0 or f"ok {r}" not in out:
                return f"{what}world {world} rank {r} (rc {p.returncode}):\n{err[-4000:]}"
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
